// Scores as integers whose order is the selection ops' order (larger first, lower index on ties; csrc/README.md,
// "Selection ops"), so that sorts and the best-few network (best_few.h) compare plain integers, which is most of
// their speed. Candidates that cannot be selected (masked, finished, NaN) get a code or key that sorts last.
//
// - rank codes: key and index in one integer, for std::sort and friends (every build);
// - rank keys: the key part alone as int32, built 8 fp32 scores at a time (AVX2 and AVX512 builds).
//
// Both only compare, convert and add zero, so every capability build orders alike.
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// -- rank codes ------------------------------------------------------------------------------------------

// Scores are compared in fp32, float64 ones in fp64.
template <typename scalar_t>
using Compared = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A selectable candidate as one unsigned integer whose ascending order is the contract's best-first order:
// its key's bits, made orderable and complemented (larger key first; -0.0 reads as +0.0 so that the two
// tie), above its index within the group (lower index first on ties). NaN keys are never encoded.
template <typename Key>
struct RankBits;
template <>
struct RankBits<float> {
  using Bits = int32_t;
  using Code = uint64_t;
};
template <>
struct RankBits<double> {
  using Bits = int64_t;
  using Code = unsigned __int128;
};

template <typename Key>
using RankCode = typename RankBits<Key>::Code;

template <typename Key>
RankCode<Key> rank_code(Key key, int64_t local) {
  using Bits = typename RankBits<Key>::Bits;
  using Unsigned = std::make_unsigned_t<Bits>;
  constexpr Unsigned kSign = Unsigned{1} << (8 * sizeof(Bits) - 1);
  // key + 0 turns -0.0 into +0.0 and changes nothing else.
  const Bits bits = c10::bit_cast<Bits>(key + Key(0));
  // Ascending value order: negatives get all bits flipped, the others their sign bit (branch-free: the
  // arithmetic shift spreads the sign over the word).
  const Unsigned sign_spread = static_cast<Unsigned>(bits >> (8 * sizeof(Bits) - 1));
  const Unsigned ascending = static_cast<Unsigned>(bits) ^ (sign_spread | kSign);
  return (static_cast<RankCode<Key>>(static_cast<Unsigned>(~ascending)) << 32) | static_cast<uint32_t>(local);
}

template <typename Code>
int64_t local_of(Code code) {
  return static_cast<int64_t>(static_cast<uint32_t>(code));
}

// The code of a candidate that cannot be selected: above every rank code (whose key part is never all
// ones: that is a NaN's pattern), so it sorts last. Giving every candidate a code, this one where it is
// not selectable, keeps the loops that build them free of branches and compaction, so they vectorise.
template <typename Code>
constexpr Code kUnselectable = ~Code{0};

// rank_code(key, local) where `selectable` (0 or 1), else kUnselectable.
template <typename Key>
RankCode<Key> rank_code_if(uint32_t selectable, Key key, int64_t local) {
  return rank_code(key, local) | (static_cast<RankCode<Key>>(selectable) - 1);
}

// Moves the best `count` of codes[0, size) to the front, best first. A heap of count (partial_sort) wins
// for count well below the size, a selection and a sort of count above that.
template <typename Code>
void order_best(Code* codes, int64_t size, int64_t count) {
  if (8 * count <= size) {
    std::partial_sort(codes, codes + count, codes + size);
  } else {
    std::nth_element(codes, codes + count, codes + size);
    std::sort(codes, codes + count);
  }
}

#if defined(__AVX2__)
// -- rank keys (256-bit paths: they also run in the AVX512 build) ----------------------------------------

// rank_code's order of an fp32 key, the key part alone as a signed 32-bit integer: smaller is better, equal
// keys tie. kNoKey (above every key: its pattern would be a NaN's) marks a candidate that is not selectable.
constexpr int32_t kNoKey = std::numeric_limits<int32_t>::max();

// Keys go 8 to a vector.
constexpr int64_t kKeyLanes = 8;

inline int32_t rank_key(float key) {
  const int32_t bits = c10::bit_cast<int32_t>(key + 0.0f);  // -0.0 reads as +0.0
  // As rank_code: negatives get all bits flipped, the others their sign bit; then complemented (larger
  // first), and the top bit flipped so that signed order is the unsigned order of rank_code's key part.
  const uint32_t ascending = static_cast<uint32_t>(bits) ^ (static_cast<uint32_t>(bits >> 31) | 0x80000000u);
  return static_cast<int32_t>(ascending ^ 0x7FFFFFFFu);
}

// The rank code of a candidate with rank key `key` (not kNoKey): the bits rank_code(value, local) gives.
inline RankCode<float> rank_code_of_key(int32_t key, int64_t local) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) | static_cast<uint32_t>(local);
}

// rank_key of 8 fp32 values, kNoKey in the lanes that `selectable` (all ones or zeros) leaves out.
inline __m256i rank_keys(__m256 values, __m256i selectable) {
  const __m256i bits = _mm256_castps_si256(_mm256_add_ps(values, _mm256_setzero_ps()));  // as rank_key
  const __m256i spread = _mm256_srai_epi32(bits, 31);
  const __m256i ascending = _mm256_xor_si256(bits, _mm256_or_si256(spread, _mm256_set1_epi32(INT32_MIN)));
  const __m256i keys = _mm256_xor_si256(ascending, _mm256_set1_epi32(INT32_MAX));
  return _mm256_blendv_epi8(_mm256_set1_epi32(kNoKey), keys, selectable);
}

// rank_keys of 8 fp32 values at keys[0, 8): kNoKey where the value is NaN or its flag (8 bytes at `flags`,
// finished; null: none) is set.
inline void store_rank_keys(__m256 values, const uint8_t* flags, int32_t* keys) {
  __m256i selectable = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_ORD_Q));  // not NaN
  if (flags != nullptr) {
    uint64_t bytes;
    std::memcpy(&bytes, flags, sizeof(bytes));
    const __m256i flag = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes)));
    selectable = _mm256_andnot_si256(_mm256_cmpgt_epi32(flag, _mm256_setzero_si256()), selectable);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys), rank_keys(values, selectable));
}

// keys[i] = rank_key(adjusted[i]), or kNoKey where flags[i] (finished; null: none) is set or adjusted[i] is
// NaN, for i < count.
inline void rank_keys_of(const float* adjusted, const uint8_t* flags, int64_t count, int32_t* keys) {
  int64_t start = 0;
  for (; start + kKeyLanes <= count; start += kKeyLanes) {
    store_rank_keys(_mm256_loadu_ps(adjusted + start), flags == nullptr ? nullptr : flags + start, keys + start);
  }
  for (; start < count; ++start) {
    const bool selectable = (flags == nullptr || flags[start] == 0) && !std::isnan(adjusted[start]);
    keys[start] = selectable ? rank_key(adjusted[start]) : kNoKey;
  }
}

// 8 scores as fp32, as static_cast<float> converts each (fp64: rounded to nearest; the others exact).
template <typename scalar_t>
inline __m256 load_scores(const scalar_t* in) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(in);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(in + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(in)));
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>);
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));  // bf16 is the top half of an fp32
  }
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
