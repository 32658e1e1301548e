// What the CPU kernels share: the Gaussian stream of common/philox.h, vectorised (Philox4x32-10 on many
// counters at once with AVX2 integer intrinsics where the build has them, Box-Muller on at::vec floats),
// fp32/fp16/bf16 loads and stores through fp32 vectors, and the parallel chunked element loop.
// Compiled once per CPU capability (csrc/README.md): FloatVec is 8 lanes wide under AVX2, 16 under AVX512
// and a plain array under the default build; the AVX2 intrinsics below run under AVX512 as well.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/philox.h"

namespace fastsearch::cpu {

using FloatVec = at::vec::Vectorized<float>;

// Counters per batch: two float vectors' worth, so that two independent Philox chains are in flight
// (one chain alone stalls on the multiply latency).
constexpr int64_t kCounterLanes = 2 * FloatVec::size();
// A batch holds 4 normals per counter, in stream order.
constexpr int64_t kBatchNormals = 4 * kCounterLanes;

#if defined(__AVX2__)
// High and low 32 bits of the eight products a[l] * factor (factor broadcast to every 32-bit lane).
inline void mul_hi_lo(__m256i a, __m256i factor, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, factor);                       // lanes 0, 2, 4, 6 as 64 bits
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), factor);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, factor);
}

// uint_to_unit_open of philox.h on eight words: r >> 8 < 2^24 converts exactly as a signed int.
inline __m256 unit_open(__m256i r) {
  const __m256 whole = _mm256_cvtepi32_ps(_mm256_srli_epi32(r, 8));
  return _mm256_mul_ps(_mm256_add_ps(whole, _mm256_set1_ps(0.5f)), _mm256_set1_ps(kUint24ToUnit));
}
#endif

// Uniforms of the Philox blocks of counters first_counter + l, l < kCounterLanes: word w in units[w][l].
inline void philox_units(uint64_t seed, uint64_t first_counter, float (&units)[4][kCounterLanes]) {
#if defined(__AVX2__)
  constexpr int kGroups = kCounterLanes / 8;
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
  const __m256i key_step_a = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxKeyA));
  const __m256i key_step_b = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxKeyB));
  const __m256i sign_bit = _mm256_set1_epi32(INT32_MIN);
  __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    const uint64_t base = first_counter + static_cast<uint64_t>(8 * g);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int32_t>(base));
    c0[g] = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // Lanes whose low word wrapped (c0 < base_lo as unsigned) carry one into the high word.
    const __m256i wrapped =
        _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign_bit), _mm256_xor_si256(c0[g], sign_bit));
    c1[g] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(base >> 32)), wrapped);
    c2[g] = _mm256_setzero_si256();
    c3[g] = _mm256_setzero_si256();
  }
  __m256i k0 = _mm256_set1_epi32(static_cast<int32_t>(seed));
  __m256i k1 = _mm256_set1_epi32(static_cast<int32_t>(seed >> 32));
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < kGroups; ++g) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(c2[g], round_b, hi_b, lo_b);
      mul_hi_lo(c0[g], round_a, hi_a, lo_a);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), k0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), k1);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
    k0 = _mm256_add_epi32(k0, key_step_a);
    k1 = _mm256_add_epi32(k1, key_step_b);
  }
  for (int g = 0; g < kGroups; ++g) {
    _mm256_store_ps(units[0] + 8 * g, unit_open(c0[g]));
    _mm256_store_ps(units[1] + 8 * g, unit_open(c1[g]));
    _mm256_store_ps(units[2] + 8 * g, unit_open(c2[g]));
    _mm256_store_ps(units[3] + 8 * g, unit_open(c3[g]));
  }
#else
  for (int64_t lane = 0; lane < kCounterLanes; ++lane) {
    const Philox4 block = philox_block(seed, first_counter + static_cast<uint64_t>(lane));
    for (int word = 0; word < 4; ++word) units[word][lane] = uint_to_unit_open(block.r[word]);
  }
#endif
}

// ln(x), and (sin(x), cos(x)) in one range reduction: the 3.5-ulp Sleef variants of the vector width, which
// keep the stream within 1e-5 of the reference, where at::vec would call the slower 1-ulp ones one at a
// time. The default build has no Sleef: at::vec calls libm per lane there.
inline FloatVec log_u35(const FloatVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Sleef_logf16_u35(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return Sleef_logf8_u35(x);
#else
  return x.log();
#endif
}

inline std::pair<FloatVec, FloatVec> sin_cos_u35(const FloatVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const Sleef___m512_2 sin_cos = Sleef_sincosf16_u35(x);
  return {sin_cos.x, sin_cos.y};
#elif defined(CPU_CAPABILITY_AVX2)
  const Sleef___m256_2 sin_cos = Sleef_sincosf8_u35(x);
  return {sin_cos.x, sin_cos.y};
#else
  return {x.sin(), x.cos()};
#endif
}

// Stream normals z_(4 first_counter) ... z_(4 first_counter + kBatchNormals - 1) into `out`.
inline void normal_batch(uint64_t seed, uint64_t first_counter, float* out) {
  constexpr int64_t kWidth = FloatVec::size();
  alignas(64) float units[4][kCounterLanes];
  philox_units(seed, first_counter, units);
  const FloatVec minus_two(-2.0f);
  const FloatVec two_pi(kTwoPi);
  for (int64_t lane = 0; lane < kCounterLanes; lane += kWidth) {
    const FloatVec radius01 = (minus_two * log_u35(FloatVec::loadu(units[0] + lane))).sqrt();
    const FloatVec radius23 = (minus_two * log_u35(FloatVec::loadu(units[2] + lane))).sqrt();
    const auto [sin1, cos1] = sin_cos_u35(FloatVec::loadu(units[1] + lane) * two_pi);
    const auto [sin3, cos3] = sin_cos_u35(FloatVec::loadu(units[3] + lane) * two_pi);
    // Lane l holds counter lane + l; stream order is z0 z1 z2 z3 per counter. Interleave (z0, z1) and
    // (z2, z3) as floats, then those pairs as 64-bit doubles.
    const auto pairs01 = at::vec::interleave2(radius01 * cos1, radius01 * sin1);
    const auto pairs23 = at::vec::interleave2(radius23 * cos3, radius23 * sin3);
    const auto low = at::vec::interleave2(at::vec::cast<double>(pairs01.first), at::vec::cast<double>(pairs23.first));
    const auto high =
        at::vec::interleave2(at::vec::cast<double>(pairs01.second), at::vec::cast<double>(pairs23.second));
    float* dst = out + 4 * lane;
    at::vec::cast<float>(low.first).store(dst);
    at::vec::cast<float>(low.second).store(dst + kWidth);
    at::vec::cast<float>(high.first).store(dst + 2 * kWidth);
    at::vec::cast<float>(high.second).store(dst + 3 * kWidth);
  }
}

// Stream normals z_first ... z_(first + count - 1) into out[0, count).
inline void fill_normals(uint64_t seed, uint64_t first, int64_t count, float* out) {
  const uint64_t end = first + static_cast<uint64_t>(count);
  alignas(64) float partial[kBatchNormals];
  for (uint64_t batch_start = first - first % 4; batch_start < end; batch_start += kBatchNormals) {
    const uint64_t batch_end = batch_start + kBatchNormals;
    if (batch_start >= first && batch_end <= end) {
      normal_batch(seed, batch_start / 4, out + (batch_start - first));
    } else {
      // A batch that straddles either end of the range: draw it whole, keep the overlap.
      normal_batch(seed, batch_start / 4, partial);
      const uint64_t from = std::max(batch_start, first);
      const uint64_t to = std::min(batch_end, end);
      std::memcpy(out + (from - first), partial + (from - batch_start), (to - from) * sizeof(float));
    }
  }
}

// -- fp32 / fp16 / bf16 elements through fp32 vectors ---------------------------------------------------

// Elements loaded, computed and stored at once: two float vectors, one fp16/bf16 vector.
constexpr int64_t kBlock = 2 * FloatVec::size();

// Elements [0, count) of src (count <= kBlock) as two float vectors; lanes past count read as zero.
template <typename scalar_t>
inline std::pair<FloatVec, FloatVec> load_block(const scalar_t* src, int64_t count = kBlock) {
  constexpr int64_t kWidth = FloatVec::size();
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {FloatVec::loadu(src, std::min(count, kWidth)),
            FloatVec::loadu(src + kWidth, std::max<int64_t>(count - kWidth, 0))};
  } else {
    const auto [low, high] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(src, count));
    return {low, high};
  }
}

// Stores the first count (<= kBlock) lanes of (low, high) to dst, rounded to scalar_t.
template <typename scalar_t>
inline void store_block(scalar_t* dst, const FloatVec& low, const FloatVec& high, int64_t count = kBlock) {
  constexpr int64_t kWidth = FloatVec::size();
  if constexpr (std::is_same_v<scalar_t, float>) {
    low.store(dst, std::min(count, kWidth));
    high.store(dst + kWidth, std::max<int64_t>(count - kWidth, 0));
  } else {
    at::vec::convert_from_float<scalar_t>(low, high).store(dst, count);
  }
}

// outputs[o][i] = math(inputs[..][i], noise[i])[o] for i < count, in fp32, kBlock elements at a time.
// math: (const std::array<FloatVec, kInputs>&, const FloatVec& noise) -> std::array<FloatVec, kOutputs>.
// A null noise reads as zeros.
template <typename scalar_t, size_t kOutputs, size_t kInputs, typename Math>
inline void map_blocks(const std::array<scalar_t*, kOutputs>& outputs,
                       const std::array<const scalar_t*, kInputs>& inputs, const float* noise, int64_t count,
                       const Math& math) {
  const auto block = [&](int64_t start, int64_t size) {
    std::array<FloatVec, kInputs> low, high;
    for (size_t k = 0; k < kInputs; ++k) std::tie(low[k], high[k]) = load_block(inputs[k] + start, size);
    FloatVec noise_low(0.0f), noise_high(0.0f);
    if (noise != nullptr) std::tie(noise_low, noise_high) = load_block(noise + start, size);
    const std::array<FloatVec, kOutputs> out_low = math(low, noise_low);
    const std::array<FloatVec, kOutputs> out_high = math(high, noise_high);
    for (size_t o = 0; o < kOutputs; ++o) store_block(outputs[o] + start, out_low[o], out_high[o], size);
  };
  int64_t start = 0;
  for (; start + kBlock <= count; start += kBlock) block(start, kBlock);
  if (start < count) block(start, count - start);
}

// -- the parallel element loop -------------------------------------------------------------------------

// Elements per work item: its fp32 noise (8 KiB) is still in L1 when the arithmetic reads it.
constexpr int64_t kChunk = 2048;
// Elements per thread at least: at::parallel_for's usual grain for memory-bound loops, and an eighth of
// it where the loop draws normals (about eight times the work per element).
constexpr int64_t kGrainElements = 32768;
constexpr int64_t kDrawingGrainElements = kGrainElements / 8;

// Where an op's noise comes from: nowhere, a tensor shaped like the output, or the stream under `seed`,
// whose normal `offset + i` goes to flat element i.
template <typename scalar_t>
struct NoiseSource {
  const scalar_t* tensor = nullptr;
  std::optional<uint64_t> seed;
  uint64_t offset = 0;

  // fp32 noise of the flat elements [first, first + count), count <= kChunk: drawn or converted into
  // `buffer`, read in place from an fp32 tensor, or nullptr when there is none.
  const float* chunk(int64_t first, int64_t count, float* buffer) const {
    if (tensor != nullptr) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        return tensor + first;
      } else {
        for (int64_t start = 0; start < count; start += kBlock) {
          const int64_t size = std::min(kBlock, count - start);
          const auto [low, high] = load_block(tensor + first + start, size);
          store_block(buffer + start, low, high, size);
        }
        return buffer;
      }
    }
    if (seed.has_value()) {
      fill_normals(*seed, offset + static_cast<uint64_t>(first), count, buffer);
      return buffer;
    }
    return nullptr;
  }
};

// Calls kernel(sample, first, count, noise) in parallel over the flat elements [0, numel), in pieces that
// lie inside one chunk and one sample (`per_sample` elements each); noise points at the piece's fp32
// noise, or is nullptr.
template <typename scalar_t, typename Kernel>
void for_each_piece(int64_t numel, int64_t per_sample, const NoiseSource<scalar_t>& noise, const Kernel& kernel) {
  if (numel == 0) return;
  // Chunks start on multiples of kChunk in stream index, so that only the two ends of the range draw
  // part of a Philox batch.
  const int64_t lead = static_cast<int64_t>(noise.offset % kChunk);
  const int64_t chunks = (lead + numel + kChunk - 1) / kChunk;
  const int64_t grain = (noise.seed.has_value() ? kDrawingGrainElements : kGrainElements) / kChunk;
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buffer[kChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = std::max<int64_t>(chunk * kChunk - lead, 0);
      const int64_t last = std::min(chunk * kChunk - lead + kChunk, numel);
      const float* chunk_noise = noise.chunk(first, last - first, buffer);
      for (int64_t start = first; start < last;) {
        const int64_t sample = start / per_sample;
        const int64_t stop = std::min(last, (sample + 1) * per_sample);
        kernel(sample, start, stop - start, chunk_noise == nullptr ? nullptr : chunk_noise + (start - first));
        start = stop;
      }
    }
  });
}

}  // namespace fastsearch::cpu
