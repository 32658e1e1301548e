// The few best (k <= 8) of a group's rank keys (rank_keys.h), best first, by a network of 256-bit vector
// min/max: beam_prune's usual call (no dedup keys, a beam of a few). No branches depend on the keys, so none
// mispredict; mispredictions otherwise dominate a top-k of a few dozen candidates (a heap or a threshold test
// mispredicts on most insertions).
//
// AVX2 only (its paths also run in the AVX512 build, at 256 bits); the default build orders rank codes
// instead (order_best). Both give the same selection, so every build returns the same bits.
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/rank_keys.h"

#if defined(__AVX2__)
#include <immintrin.h>

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// k up to this many of a group are found by the network; more take order_best.
constexpr int64_t kMaxNetworkK = 8;

inline __m256i lane_indices() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

// All ones in the lanes below `count`.
inline __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane_indices());
}

// The K smallest keys seen in each of 8 lanes, sorted per lane (best[0] <= best[1] <= ...), kept by a
// min/max insertion network. After merge_lanes every lane holds the K smallest of all keys seen.
template <int K>
struct LaneBest {
  __m256i best[K];

  LaneBest() {
    for (int j = 0; j < K; ++j) best[j] = _mm256_set1_epi32(kNoKey);
  }

  void insert(__m256i keys) {
    for (int j = 0; j < K; ++j) {
      const __m256i low = _mm256_min_epi32(best[j], keys);
      keys = _mm256_max_epi32(best[j], keys);
      best[j] = low;
    }
  }

  // Merges each lane's list with its partner lane's (partner(v) moves every lane to its partner's place):
  // min(a_j, b_(K-1-j)) is a bitonic sequence of the K smallest of both sorted lists; half-cleaners sort it.
  template <typename Partner>
  void merge(const Partner& partner) {
    __m256i merged[K];
    for (int j = 0; j < K; ++j) merged[j] = _mm256_min_epi32(best[j], partner(best[K - 1 - j]));
    for (int stride = K / 2; stride > 0; stride /= 2) {
      for (int j = 0; j < K; ++j) {
        if ((j & stride) != 0) continue;
        const __m256i low = _mm256_min_epi32(merged[j], merged[j + stride]);
        merged[j + stride] = _mm256_max_epi32(merged[j], merged[j + stride]);
        merged[j] = low;
      }
    }
    for (int j = 0; j < K; ++j) best[j] = merged[j];
  }

  void merge_lanes() {
    merge([](__m256i v) { return _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)); });  // lanes 0 <-> 1, ...
    merge([](__m256i v) { return _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)); });  // 0 <-> 2, ...
    merge([](__m256i v) { return _mm256_permute2x128_si256(v, v, 1); });                // 0 <-> 4, ...
  }

  // The rank-th smallest (0-based, rank < K) of all keys seen, after merge_lanes.
  int32_t smallest(int64_t rank) const {
    int32_t value = kNoKey;
    for (int j = 0; j < K; ++j) value = j == rank ? _mm256_cvtsi256_si32(best[j]) : value;
    return value;
  }
};

// The best min(k, selectable) of a group's candidates, best first, k <= K: emit(place, local, count) for
// every place < count; returns count. keys: the group's rank keys, keys[size, size + 8) readable (their values
// do not matter); codes: room for size (used when the k-th best ties with candidates past the k-th).
template <int K, typename Emit>
int64_t take_best(const int32_t* keys, int64_t size, int64_t k, RankCode<float>* codes, const Emit& emit) {
  LaneBest<K> lanes;
  int64_t start = 0;
  for (; start + kKeyLanes <= size; start += kKeyLanes) {
    lanes.insert(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + start)));
  }
  if (start < size) {
    const __m256i block = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + start));
    lanes.insert(_mm256_blendv_epi8(_mm256_set1_epi32(kNoKey), block, lanes_below(size - start)));
  }
  lanes.merge_lanes();
  // Lane j < K: the j-th smallest key; the others kNoKey.
  __m256i smallest = _mm256_set1_epi32(kNoKey);
  for (int j = 0; j < K; ++j) {
    smallest = _mm256_blendv_epi8(smallest, lanes.best[j], _mm256_cmpeq_epi32(lane_indices(), _mm256_set1_epi32(j)));
  }
  // The chosen: keys below the bound, the k-th smallest's successor (every selectable one when fewer
  // than k are), all counted before any is placed.
  const int32_t kth = lanes.smallest(k - 1);
  const int32_t bound = kth == kNoKey ? kNoKey : kth + 1;
  const __m256i below_bound = _mm256_set1_epi32(bound);
  // Bit i: candidate word + i is chosen, for the 64 candidates from `word`.
  const auto chosen_bits = [&](int64_t word) {
    const int64_t word_size = std::min<int64_t>(64, size - word);
    uint64_t bits = 0;
    for (int64_t block = 0; block < word_size; block += kKeyLanes) {
      const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + word + block));
      const int below = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(below_bound, values)));
      bits |= static_cast<uint64_t>(below) << block;
    }
    return word_size < 64 ? bits & ((uint64_t{1} << word_size) - 1) : bits;
  };
  const uint64_t first_bits = chosen_bits(0);
  int64_t found = __builtin_popcountll(first_bits);
  for (int64_t word = 64; word < size && found <= k; word += 64) found += __builtin_popcountll(chosen_bits(word));
  if (found > k) {  // the k-th ties with candidates past it: sort those out
    int64_t tied = 0;
    for (int64_t local = 0; local < size; ++local) {
      if (keys[local] < bound) codes[tied++] = rank_code_of_key(keys[local], local);
    }
    order_best(codes, tied, k);
    for (int64_t place = 0; place < k; ++place) emit(place, local_of(codes[place]), k);
    return k;
  }
  // Exactly the chosen (k, or every selectable one), in index order. Each one's place is the number of
  // smaller keys (all among the K smallest), plus the number of equal keys chosen before it: no sort, so
  // no mispredicted branches.
  __m256i chosen_keys = _mm256_set1_epi32(kNoKey);  // lane i: the i-th chosen one's key
  int64_t placed = 0;
  for (int64_t word = 0; word < size; word += 64) {
    for (uint64_t bits = word == 0 ? first_bits : chosen_bits(word); bits != 0; bits &= bits - 1, ++placed) {
      const int64_t local = word + __builtin_ctzll(bits);
      const __m256i key = _mm256_set1_epi32(keys[local]);
      const int smaller = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, smallest)));
      const int equal = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, chosen_keys)));
      emit(__builtin_popcount(static_cast<unsigned>(smaller)) + __builtin_popcount(static_cast<unsigned>(equal)),
           local, found);
      const __m256i lane = _mm256_cmpeq_epi32(lane_indices(), _mm256_set1_epi32(static_cast<int32_t>(placed)));
      chosen_keys = _mm256_blendv_epi8(chosen_keys, key, lane);
    }
  }
  return found;  // k, or every selectable one
}

// take_best for any k <= kMaxNetworkK.
template <typename Emit>
int64_t take_best_few(const int32_t* keys, int64_t size, int64_t k, RankCode<float>* codes, const Emit& emit) {
  if (k <= 1) return take_best<1>(keys, size, k, codes, emit);
  if (k <= 2) return take_best<2>(keys, size, k, codes, emit);
  if (k <= 4) return take_best<4>(keys, size, k, codes, emit);
  return take_best<8>(keys, size, k, codes, emit);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
#endif
