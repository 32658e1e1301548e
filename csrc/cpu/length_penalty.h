// beam_prune's length penalty: the divisors lengths.float() ** length_penalty by which it divides the
// scores (csrc/README.md, "Selection ops"), computed as torch does and alike in every capability build.
//
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/groups.h"
#include "cpu/rank_keys.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

#if defined(__AVX2__)
// 8 int64 values as fp32 into `out`, if all fit in int32: AVX2 converts int32, not int64, to float, and
// for such values narrowing first rounds the same integer to nearest as static_cast<float> does.
inline bool narrow_to_float(const int64_t* in, __m256& out) {
  const __m256i bias = _mm256_set1_epi64x(int64_t{1} << 31);  // fits in int32 <=> biased fits in uint32
  const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 4));
  const __m256i biased = _mm256_or_si256(_mm256_add_epi64(first, bias), _mm256_add_epi64(second, bias));
  if (!_mm256_testz_si256(biased, _mm256_set1_epi64x(~int64_t{0xFFFFFFFF}))) return false;
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i narrowed = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(first, low_words),
                                                     _mm256_permutevar8x32_epi32(second, low_words), 0x20);
  out = _mm256_cvtepi32_ps(narrowed);
  return true;
}

// 8 int64 lengths as fp32, as static_cast<float> converts each.
inline __m256 load_lengths(const int64_t* in) {
  __m256 lengths;
  if (narrow_to_float(in, lengths)) return lengths;
  alignas(32) float wide[kKeyLanes];
  for (int64_t lane = 0; lane < kKeyLanes; ++lane) wide[lane] = static_cast<float>(in[lane]);
  return _mm256_load_ps(wide);
}

// transform(static_cast<float>(in[i])) into out[i], for i < size; transform maps 8 floats (an __m256, so
// that the AVX512 build, whose FloatVec holds 16, runs this loop unchanged) to 8 floats.
template <typename Transform>
void int64_to_float(const int64_t* in, int64_t size, float* out, const Transform& transform) {
  int64_t start = 0;
  for (; start + kKeyLanes <= size; start += kKeyLanes) {
    _mm256_storeu_ps(out + start, transform(load_lengths(in + start)));
  }
  if (start == size) return;
  alignas(32) float wide[kKeyLanes] = {};  // the tail, padded with zeros
  for (int64_t lane = 0; start + lane < size; ++lane) wide[lane] = static_cast<float>(in[start + lane]);
  _mm256_store_ps(wide, transform(_mm256_load_ps(wide)));
  std::memcpy(out + start, wide, (size - start) * sizeof(float));
}
#endif

// The divisor lengths.float() ** p as torch computes it: exponent 1 is the length itself, 2 its square
// and 0.5 its sqrt (torch's special cases, exact); any other exponent takes libm's powf.
enum class PenaltyForm { kNone, kLength, kSquare, kSquareRoot, kPower };

// Integer lengths count tokens, so the lengths of a call span a short range: a general pow (a few dozen
// instructions per vector) then runs once per length of that range, into a table, rather than once per
// candidate, with equal results. A table pays when the range holds at most half as many lengths as the
// call has candidates. The other forms cost about what a table lookup does, and take no pass over the
// lengths to find their range.
constexpr int64_t kCandidatesPerTableEntry = 2;

struct LengthPenalty {
  PenaltyForm form = PenaltyForm::kNone;
  float exponent = 0.0f;
  at::ScalarType length_type = at::kFloat;
  const void* lengths = nullptr;
  const float* table = nullptr;  // the divisors of lengths table_first, table_first + 1, ..., or null
  int64_t table_first = 0;

  // lanes[i] = lanes[i] ** exponent, by libm one lane at a time: what the default build's at::vec does,
  // so that every build rounds alike (Sleef's vector pow does not).
  template <size_t kLanes>
  void power_in_place(float (&lanes)[kLanes]) const {
    for (float& lane : lanes) lane = std::pow(lane, exponent);
  }

  // The divisors of a vector of fp32 lengths.
  FloatVec divisor(const FloatVec& length) const {
    if (form == PenaltyForm::kSquare) return length * length;
    if (form == PenaltyForm::kSquareRoot) return length.sqrt();
    if (form == PenaltyForm::kPower) {
      alignas(64) float lanes[FloatVec::size()];
      length.store(lanes);
      power_in_place(lanes);
      return FloatVec::loadu(lanes);
    }
    return length;
  }

#if defined(__AVX2__)
  // The divisors of 8 fp32 lengths, for the 256-bit paths.
  __m256 divisor(__m256 length) const {
    if (form == PenaltyForm::kSquare) return _mm256_mul_ps(length, length);
    if (form == PenaltyForm::kSquareRoot) return _mm256_sqrt_ps(length);
    if (form == PenaltyForm::kPower) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, length);
      power_in_place(lanes);
      return _mm256_load_ps(lanes);
    }
    return length;
  }
#endif

  // divisors[i] = the divisor of the fp32 length lengths[i], for i < size (in place is fine).
  void divisors_of(const float* lengths_in, int64_t size, float* divisors) const {
    for (int64_t start = 0; start < size; start += FloatVec::size()) {
      const int64_t lanes = std::min<int64_t>(FloatVec::size(), size - start);
      divisor(FloatVec::loadu(lengths_in + start, lanes)).store(divisors + start, lanes);
    }
  }

  // divisors[i] = the divisor of candidate begin + i, for i < size.
  void divisors_for(int64_t begin, int64_t size, float* divisors) const {
    if (table != nullptr) {
      AT_DISPATCH_V2(length_type, "length_table", AT_WRAP([&] {
        const scalar_t* in = static_cast<const scalar_t*>(lengths) + begin;
        // Unrolled: rolled, this loop is so short that its speed hangs on where it lands in the code (a
        // fifth slower where it straddles a 64-byte line, on an AMD EPYC).
        _Pragma("GCC unroll 8")
        for (int64_t i = 0; i < size; ++i) divisors[i] = table[static_cast<int64_t>(in[i]) - table_first];
      }), AT_EXPAND(AT_INTEGRAL_TYPES));
      return;
    }
#if defined(__AVX2__)
    if (length_type == at::kLong) {  // token counts, the usual lengths: converted and raised in one pass
      int64_to_float(static_cast<const int64_t*>(lengths) + begin, size, divisors,
                     [&](__m256 length) { return divisor(length); });
      return;
    }
#endif
    to_float(length_type, lengths, begin, size, divisors);
    divisors_of(divisors, size, divisors);
  }
};

// The penalty for checked `lengths` (contiguous, or undefined for none); a table it builds lives in `table`.
inline LengthPenalty length_penalty_of(const at::Tensor& lengths, double penalty, std::vector<float>& table) {
  LengthPenalty result;
  if (!lengths.defined() || penalty == 0.0) return result;
  result.form = PenaltyForm::kPower;
  if (penalty == 1.0) {
    result.form = PenaltyForm::kLength;
  } else if (penalty == 2.0) {
    result.form = PenaltyForm::kSquare;
  } else if (penalty == 0.5) {
    result.form = PenaltyForm::kSquareRoot;
  }
  result.exponent = static_cast<float>(penalty);
  result.length_type = lengths.scalar_type();
  result.lengths = lengths.const_data_ptr();
  const int64_t total = lengths.numel();
  if (result.form != PenaltyForm::kPower || !at::isIntegralType(result.length_type, false) || total == 0) {
    return result;
  }
  int64_t lowest = 0;
  int64_t highest = 0;
  AT_DISPATCH_V2(result.length_type, "length_range", AT_WRAP([&] {
    const scalar_t* in = static_cast<const scalar_t*>(result.lengths);
    scalar_t low = in[0];
    scalar_t high = in[0];
    for (int64_t i = 1; i < total; ++i) {  // vectorises, unlike std::minmax_element
      low = std::min(low, in[i]);
      high = std::max(high, in[i]);
    }
    lowest = static_cast<int64_t>(low);
    highest = static_cast<int64_t>(high);
  }), AT_EXPAND(AT_INTEGRAL_TYPES));
  // Unsigned: the span of extreme int64 lengths overflows int64.
  const uint64_t span = static_cast<uint64_t>(highest) - static_cast<uint64_t>(lowest);
  if (span >= static_cast<uint64_t>(total / kCandidatesPerTableEntry)) return result;
  const int64_t entries = static_cast<int64_t>(span) + 1;
  float* divisors = room_for(table, entries);
  for (int64_t i = 0; i < entries; ++i) divisors[i] = static_cast<float>(lowest + i);
  result.divisors_of(divisors, entries, divisors);
  result.table = divisors;
  result.table_first = lowest;
  return result;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
