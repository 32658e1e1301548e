// CPU kernels of the selection ops: segmented top-k, beam pruning, resampling, effective sample size,
// voting and sequence keys. Semantics: csrc/README.md ("Selection ops"); oracle: fastsearch/ops/select.py.
//
// Every op walks its groups with at::parallel_for, one group at a time per thread, in thread-local scratch
// space that stays allocated between calls (a warm call allocates its outputs and nothing else).
// Selection packs each selectable candidate's (key, index) pair into one integer whose order is the
// contract's (larger key first, lower index on ties) and orders the best k with std::partial_sort or
// std::nth_element; unselectable candidates (masked, finished, NaN) get a code that sorts last. beam_prune
// without dedup keys and k <= 8 (a beam search's usual call) finds its few best with vector min/max
// instead, branch-free (take_best). Equal int64 keys (beam_prune's dedup keys, vote's answers) are grouped
// by a small open-addressing table.
// Weights are fp32 as in the reference (exp and pow within an ulp of the exact values, as torch's are), and
// sums run in fp64, rounded once to fp32 (torch's cumsum does the same).
//
// Compiled once per CPU capability (csrc/README.md), and every build gives the same bits: the AVX2 paths
// below only compare, convert and divide (exact in any width), exp is written here with exactly rounded
// operations (Sleef's vector exp and libm's expf, which the default build's at::vec calls, differ in the
// last place), and pow is libm's in every build.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/select_checks.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
namespace {

constexpr float kInfinity = std::numeric_limits<float>::infinity();

// -- inputs, outputs, scratch ----------------------------------------------------------------------------

// Borrowed views where the inputs are already contiguous (the usual case): no dispatcher round trip.
using Contiguous = c10::MaybeOwned<at::Tensor>;

Contiguous contiguous_or_none(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->expect_contiguous() : Contiguous::owned(std::in_place);
}

template <typename T>
const T* data_or_null(const Contiguous& tensor) {
  return tensor->defined() ? tensor->const_data_ptr<T>() : nullptr;
}

// The bytes (0 or 1) of an optional bool tensor, or nullptr: loops over bytes vectorise, over bools not.
const uint8_t* flags_or_null(const Contiguous& tensor) {
  return reinterpret_cast<const uint8_t*>(data_or_null<bool>(tensor));
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) { return at::detail::empty_cpu(sizes, dtype); }

// Per-thread scratch space of one kind, kept from call to call.
template <typename Scratch>
Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

// Room for `size` elements in a scratch vector. It only ever grows, so that refills are not zeroed; the
// loops write through the raw pointer (push_back's reloads of the end pointer cost more than the work).
template <typename T>
T* room_for(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// values[begin, begin + size) of a tensor of `dtype`, as fp32 (lengths.float(), scores.float()).
void to_float(at::ScalarType dtype, const void* values, int64_t begin, int64_t size, float* out) {
  AT_DISPATCH_V2(dtype, "to_float", AT_WRAP([&] {
    const scalar_t* in = static_cast<const scalar_t*>(values) + begin;
    for (int64_t i = 0; i < size; ++i) out[i] = static_cast<float>(in[i]);
  }), AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16);
}

// -- groups ----------------------------------------------------------------------------------------------

// Where each group's candidates lie: rows of a dense [G, C] tensor, or CSR offsets into a flat one.
struct Groups {
  const int64_t* offsets;  // nullptr for dense groups
  int64_t count;
  int64_t dense_size;
  int64_t total;

  int64_t begin(int64_t group) const { return offsets == nullptr ? group * dense_size : offsets[group]; }
  int64_t size(int64_t group) const {
    return offsets == nullptr ? dense_size : offsets[group + 1] - offsets[group];
  }
  // The index an op reports: row-local for dense groups, flat for ragged ones.
  int64_t reported(int64_t begin, int64_t local) const { return offsets == nullptr ? local : begin + local; }
};

// Rank codes (below) hold a candidate's index within its group in 32 bits.
constexpr int64_t kMaxGroupSize = int64_t{1} << 32;

// The groups of checked `values`; `offsets` (contiguous, or undefined for dense input) must outlive them.
Groups groups_of(const at::Tensor& values, const at::Tensor& offsets) {
  const Groups groups = offsets.defined()
                            ? Groups{offsets.const_data_ptr<int64_t>(), offsets.numel() - 1, 0, values.numel()}
                            : Groups{nullptr, values.size(0), values.size(1), values.numel()};
  if (groups.total >= kMaxGroupSize) {  // only then can a group be too large
    for (int64_t group = 0; group < groups.count; ++group) {
      TORCH_CHECK_VALUE(groups.size(group) < kMaxGroupSize, "groups must hold fewer than 2^32 candidates, got ",
                        groups.size(group), " in group ", group);
    }
  }
  return groups;
}

// Work, in nanoseconds, that each thread of a parallel loop gets at least. A fork-join of at::parallel_for
// costs 1 to 2 us while the pool's threads spin, and 10 to 20 us once they sleep, as they usually have
// between the steps of a search (a step waits for the model); below this, one thread does it all.
constexpr double kGrainNanoseconds = 20000.0;

// About what a group costs on one core, in nanoseconds: per candidate, and per group (measured with AVX2).
struct GroupCost {
  double per_candidate;
  double per_group;
};

// The grain (in groups) of a parallel loop over `groups`.
int64_t group_grain(const Groups& groups, GroupCost cost) {
  const double mean_size = static_cast<double>(groups.total) / static_cast<double>(std::max<int64_t>(groups.count, 1));
  const double per_group = std::max(cost.per_candidate * mean_size + cost.per_group, 1.0);
  return std::max<int64_t>(1, static_cast<int64_t>(kGrainNanoseconds / per_group));
}

// Calls body(group, begin, size) for every group, in parallel over groups.
template <typename Body>
void for_each_group(const Groups& groups, GroupCost cost, const Body& body) {
  if (groups.count == 0) return;
  at::parallel_for(0, groups.count, group_grain(groups, cost), [&](int64_t first, int64_t last) {
    for (int64_t group = first; group < last; ++group) body(group, groups.begin(group), groups.size(group));
  });
}

// -- order -----------------------------------------------------------------------------------------------

// Scores are compared in fp32, float64 ones in fp64.
template <typename scalar_t>
using Compared = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A selectable candidate as one unsigned integer whose ascending order is the contract's best-first order:
// its key's bits, made orderable and complemented (larger key first; -0.0 reads as +0.0 so that the two
// tie), above its index within the group (lower index first on ties). The sorts then compare plain
// integers, which is most of their speed. NaN keys are never encoded.
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

// body(std::true_type{}) when `present`, else body(std::false_type{}): a loop over an optional input then
// tests its presence at compile time (a test per element keeps the loop from vectorising).
template <typename Body>
auto with_optional(bool present, const Body& body) {
  return present ? body(std::true_type{}) : body(std::false_type{});
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

// -- few best of many ------------------------------------------------------------------------------------

#if defined(__AVX2__)
// rank_code's order of an fp32 key, the key part alone as a signed 32-bit integer: smaller is better, equal
// keys tie. kNoKey (above every key: its pattern would be a NaN's) marks a candidate that is not selectable.
constexpr int32_t kNoKey = std::numeric_limits<int32_t>::max();

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

// Keys go 8 to a vector.
constexpr int64_t kKeyLanes = 8;

// k up to this many of a group are found by a network of vector min/max (below); more take order_best.
constexpr int64_t kMaxNetworkK = 8;

inline __m256i lane_indices() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

// All ones in the lanes below `count`.
inline __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane_indices());
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

// The K smallest keys seen in each of 8 lanes, sorted per lane (best[0] <= best[1] <= ...), kept by a
// min/max insertion network: no branches, so no mispredictions, which otherwise dominate a top-k of a few
// dozen candidates (a heap or a threshold test mispredicts on most insertions). After merge_lanes every
// lane holds the K smallest of all keys seen.
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

// keys[i] = rank_key(adjusted[i]), or kNoKey where flags[i] (finished; null: none) is set or adjusted[i] is
// NaN, for i < count.
void rank_keys_of(const float* adjusted, const uint8_t* flags, int64_t count, int32_t* keys) {
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

// transform(static_cast<float>(in[i])) into out[i], for i < size; transform maps 8 floats (an __m256, so
// that the AVX512 build, whose FloatVec holds 16, runs this loop unchanged) to 8 floats.
template <typename Transform>
void int64_to_float(const int64_t* in, int64_t size, float* out, const Transform& transform) {
  for (int64_t start = 0; start < size; start += kKeyLanes) {
    const int64_t lanes = std::min(kKeyLanes, size - start);
    __m256 narrowed;
    if (lanes == kKeyLanes && narrow_to_float(in + start, narrowed)) {
      _mm256_storeu_ps(out + start, transform(narrowed));
      continue;
    }
    alignas(32) float wide[kKeyLanes] = {};
    for (int64_t lane = 0; lane < lanes; ++lane) wide[lane] = static_cast<float>(in[start + lane]);
    _mm256_store_ps(wide, transform(_mm256_load_ps(wide)));
    std::memcpy(out + start, wide, lanes * sizeof(float));
  }
}
#endif

// The splitmix64 finaliser (sequence keys, and the key tables' slot choice).
uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Dense ids 0, 1, 2, ... for the distinct int64 keys of one group, in order of first appearance: an
// open-addressing table at most half full, emptied per group.
class KeyIds {
 public:
  // Empties the table for at most `capacity` distinct keys.
  void reset(int64_t capacity) {
    size_t slots = 16;
    while (slots < 2 * static_cast<size_t>(capacity)) slots *= 2;
    ids_.assign(slots, kEmpty);
    keys_.resize(slots);
    mask_ = slots - 1;
    distinct_ = 0;
  }

  // The id of `key`; a key not seen before gets the next id (the number of keys seen so far).
  int64_t id(int64_t key) {
    for (size_t slot = mix64(static_cast<uint64_t>(key)) & mask_;; slot = (slot + 1) & mask_) {
      if (ids_[slot] == kEmpty) {
        keys_[slot] = key;
        ids_[slot] = distinct_;
        return distinct_++;
      }
      if (keys_[slot] == key) return ids_[slot];
    }
  }

 private:
  static constexpr int64_t kEmpty = -1;
  std::vector<int64_t> keys_;
  std::vector<int64_t> ids_;
  size_t mask_ = 0;
  int64_t distinct_ = 0;
};

// -- segmented_topk --------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> segmented_topk(const at::Tensor& scores, const std::optional<at::Tensor>& offsets,
                                                  const std::optional<at::Tensor>& mask, int64_t k, bool largest) {
  check_segmented_topk_args(scores, offsets, mask, k);
  const Contiguous x = scores.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous selectable = contiguous_or_none(mask);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor values = empty_output({groups.count, k}, x->scalar_type());
  at::Tensor indices = empty_output({groups.count, k}, at::kLong);
  const uint8_t* mask_data = flags_or_null(selectable);

  AT_DISPATCH_V2(x->scalar_type(), "segmented_topk", AT_WRAP([&] {
    using Key = Compared<scalar_t>;
    const scalar_t* in = x->const_data_ptr<scalar_t>();
    scalar_t* values_out = values.mutable_data_ptr<scalar_t>();
    int64_t* indices_out = indices.mutable_data_ptr<int64_t>();
    const scalar_t pad = static_cast<scalar_t>(largest ? -kInfinity : kInfinity);
    for_each_group(groups, {1.25, 30.0}, [&](int64_t group, int64_t begin, int64_t size) {
      RankCode<Key>* candidates = room_for(thread_scratch<std::vector<RankCode<Key>>>(), size);
      const int64_t selectable = with_optional(mask_data != nullptr, [&](auto has_mask) {
        int64_t chosen_count = 0;
        for (int64_t local = 0; local < size; ++local) {
          const Key value = static_cast<Key>(in[begin + local]);
          const uint32_t unmasked = has_mask ? mask_data[begin + local] : 1;
          const uint32_t chosen = unmasked & static_cast<uint32_t>(value == value);  // not NaN
          candidates[local] = rank_code_if(chosen, largest ? value : -value, local);  // smallest first: -value
          chosen_count += chosen;
        }
        return chosen_count;
      });
      const int64_t count = std::min(k, selectable);
      order_best(candidates, size, count);
      scalar_t* row_values = values_out + group * k;
      int64_t* row_indices = indices_out + group * k;
      for (int64_t position = 0; position < count; ++position) {
        const int64_t local = local_of(candidates[position]);
        row_values[position] = in[begin + local];
        row_indices[position] = groups.reported(begin, local);
      }
      std::fill(row_values + count, row_values + k, pad);
      std::fill(row_indices + count, row_indices + k, int64_t{-1});
    });
  }), AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16);
  return {values, indices};
}

// -- beam_prune ------------------------------------------------------------------------------------------

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
LengthPenalty length_penalty_of(const at::Tensor& lengths, double penalty, std::vector<float>& table) {
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

#if defined(__AVX2__)
// The fp32 adjusted scores and the rank keys of `count` candidates (a multiple of 8) in one vector loop:
// scores converted, divided by their divisors (those of `lengths`, int64, when given; else those in
// `divisors` when given; else none), keys kNoKey where `finished` (when given) or NaN.
template <typename scalar_t>
void adjust_and_rank(const scalar_t* scores, const LengthPenalty& penalty, const int64_t* lengths,
                     const float* divisors, const uint8_t* finished, int64_t count, float* adjusted, int32_t* keys) {
  for (int64_t start = 0; start < count; start += kKeyLanes) {
    __m256 value = load_scores(scores + start);
    if (lengths != nullptr) {
      __m256 length;
      if (!narrow_to_float(lengths + start, length)) {
        alignas(32) float wide[kKeyLanes];
        for (int64_t lane = 0; lane < kKeyLanes; ++lane) wide[lane] = static_cast<float>(lengths[start + lane]);
        length = _mm256_load_ps(wide);
      }
      value = _mm256_div_ps(value, penalty.divisor(length));
    } else if (divisors != nullptr) {
      value = _mm256_div_ps(value, _mm256_loadu_ps(divisors + start));
    }
    _mm256_storeu_ps(adjusted + start, value);
    store_rank_keys(value, finished == nullptr ? nullptr : finished + start, keys + start);
  }
}
#endif

// Candidates prepared at a time: the fp32 scores, divisors and rank keys of a batch of whole groups stay in
// L1. Each pass over a batch runs as one vector loop; per group, vector loads then read data stored long
// before (a load over the partly stored tail of a group just written would wait for those stores).
constexpr int64_t kBatchCandidates = 2048;

struct BeamScratch {
  std::vector<float> adjusted;  // of a batch
  std::vector<float> divisors;
  std::vector<int32_t> keys;    // rank keys of a batch (few_best)
  std::vector<RankCode<float>> candidates;
  std::vector<RankCode<float>> best_of_key;  // indexed by dedup-key id
  KeyIds key_ids;
  std::vector<float> length_table;  // the calling thread's, read by every thread of the call
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_prune(
    const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t k,
    const std::optional<at::Tensor>& finished, const std::optional<at::Tensor>& lengths, double length_penalty,
    const std::optional<at::Tensor>& dedup_keys, int64_t refill_to) {
  check_beam_prune_args(scores, offsets, k, finished, lengths, dedup_keys, refill_to);
  const Contiguous x = scores.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous done = contiguous_or_none(finished);
  const Contiguous length_values = contiguous_or_none(lengths);
  const Contiguous keys = contiguous_or_none(dedup_keys);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor indices = empty_output({groups.count, k}, at::kLong);
  at::Tensor values = empty_output({groups.count, k}, at::kFloat);
  at::Tensor counts = empty_output({groups.count}, at::kLong);
  at::Tensor parents = empty_output({groups.count, refill_to}, at::kLong);
  if (groups.count == 0) return {indices, values, counts, parents};

  const at::ScalarType score_type = x->scalar_type();
  const void* score_data = x->const_data_ptr();
  const LengthPenalty penalty =
      length_penalty_of(*length_values, length_penalty, thread_scratch<BeamScratch>().length_table);
  const uint8_t* finished_data = flags_or_null(done);
  const int64_t* key_data = data_or_null<int64_t>(keys);
  int64_t* indices_out = indices.mutable_data_ptr<int64_t>();
  float* values_out = values.mutable_data_ptr<float>();
  int64_t* counts_out = counts.mutable_data_ptr<int64_t>();
  int64_t* parents_out = parents.mutable_data_ptr<int64_t>();
#if defined(__AVX2__)
  // Without dedup keys, the best few of a group come from take_best; otherwise from order_best.
  const bool few_best = key_data == nullptr && k <= kMaxNetworkK;
#else
  const bool few_best = false;
#endif

  // The fp32 adjusted scores (and with few_best the rank keys, 8 more readable past the end) of the
  // candidates [first, first + count) into the batch arrays.
  const auto prepare = [&](BeamScratch& s, int64_t first, int64_t count) {
    float* adjusted = room_for(s.adjusted, count);
    float* divisors = penalty.form == PenaltyForm::kNone ? nullptr : room_for(s.divisors, count);
    int64_t done = 0;
#if defined(__AVX2__)
    const uint8_t* flags = finished_data == nullptr ? nullptr : finished_data + first;
    int32_t* rank_keys = few_best ? room_for(s.keys, count + kKeyLanes) : nullptr;
    if (few_best) {  // whole vectors in one loop
      done = count / kKeyLanes * kKeyLanes;
      const bool int64_lengths = divisors != nullptr && penalty.table == nullptr && penalty.length_type == at::kLong;
      if (divisors != nullptr && !int64_lengths) penalty.divisors_for(first, done, divisors);
      const int64_t* lengths = int64_lengths ? static_cast<const int64_t*>(penalty.lengths) + first : nullptr;
      AT_DISPATCH_V2(score_type, "beam_prune", AT_WRAP([&] {
        adjust_and_rank(static_cast<const scalar_t*>(score_data) + first, penalty, lengths,
                        int64_lengths ? nullptr : divisors, flags, done, adjusted, rank_keys);
      }), AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16);
    }
#endif
    // The rest (all of it without few_best): pass by pass.
    const int64_t rest = count - done;
    to_float(score_type, score_data, first + done, rest, adjusted + done);
    if (divisors != nullptr) {
      penalty.divisors_for(first + done, rest, divisors + done);
      for (int64_t i = done; i < count; ++i) adjusted[i] /= divisors[i];
    }
#if defined(__AVX2__)
    if (few_best) rank_keys_of(adjusted + done, flags == nullptr ? nullptr : flags + done, rest, rank_keys + done);
#endif
  };

  // One group's best: emit(place, local, count) for every place < count; returns count.
  const auto select = [&](BeamScratch& s, int64_t begin, int64_t size, const float* adjusted,
                          const int32_t* rank_keys, const auto& emit) -> int64_t {
    RankCode<float>* candidates = room_for(s.candidates, size);
#if defined(__AVX2__)
    if (few_best) return take_best_few(rank_keys, size, k, candidates, emit);
#endif
    int64_t selectable = with_optional(finished_data != nullptr, [&](auto has_finished) {
      int64_t chosen_count = 0;
      for (int64_t local = 0; local < size; ++local) {
        const uint32_t running = has_finished ? 1u ^ finished_data[begin + local] : 1u;
        const uint32_t chosen = running & static_cast<uint32_t>(adjusted[local] == adjusted[local]);  // not NaN
        candidates[local] = rank_code_if(chosen, adjusted[local], local);
        chosen_count += chosen;
      }
      return chosen_count;
    });
    int64_t ranked = size;
    if (key_data != nullptr) {  // keep the best code of each dedup key (the first of equally good ones)
      RankCode<float>* best_of_key = room_for(s.best_of_key, selectable);
      s.key_ids.reset(selectable);
      int64_t distinct = 0;
      for (int64_t local = 0; local < size; ++local) {
        if (candidates[local] == kUnselectable<RankCode<float>>) continue;
        const int64_t id = s.key_ids.id(key_data[begin + local]);
        if (id == distinct) {
          best_of_key[distinct++] = candidates[local];
        } else {
          best_of_key[id] = std::min(best_of_key[id], candidates[local]);
        }
      }
      candidates = best_of_key;
      ranked = selectable = distinct;
    }
    const int64_t count = std::min(k, selectable);
    order_best(candidates, ranked, count);
    for (int64_t place = 0; place < count; ++place) emit(place, local_of(candidates[place]), count);
    return count;
  };

  const GroupCost cost = few_best ? GroupCost{0.6, 50.0} : GroupCost{6.0, 50.0};
  at::parallel_for(0, groups.count, group_grain(groups, cost), [&](int64_t first_group, int64_t last_group) {
    BeamScratch& s = thread_scratch<BeamScratch>();
    for (int64_t batch_first = first_group; batch_first < last_group;) {
      // Whole groups, up to kBatchCandidates candidates (at least one group).
      const int64_t batch_begin = groups.begin(batch_first);
      int64_t batch_last = batch_first + 1;
      while (batch_last < last_group &&
             groups.begin(batch_last) + groups.size(batch_last) - batch_begin <= kBatchCandidates) {
        ++batch_last;
      }
      const int64_t batch_end = groups.begin(batch_last - 1) + groups.size(batch_last - 1);
      prepare(s, batch_begin, batch_end - batch_begin);
      for (int64_t group = batch_first; group < batch_last; ++group) {
        const int64_t begin = groups.begin(group);
        const int64_t size = groups.size(group);
        const float* adjusted = s.adjusted.data() + (begin - batch_begin);
        int64_t* row_indices = indices_out + group * k;
        float* row_values = values_out + group * k;
        const int32_t* rank_keys = few_best ? s.keys.data() + (begin - batch_begin) : nullptr;
        int64_t* row_parents = parents_out + group * refill_to;
        // Survivor j of c also fills next step's beams j, j + c, j + 2 c, ..., written here from the value in
        // hand (reading the row back would wait on stores to computed places).
        const int64_t count =
            select(s, begin, size, adjusted, rank_keys, [&](int64_t place, int64_t local, int64_t survivors) {
              const int64_t index = groups.reported(begin, local);
              row_indices[place] = index;
              row_values[place] = adjusted[local];
              for (int64_t slot = place; slot < refill_to; slot += survivors) row_parents[slot] = index;
            });
        std::fill(row_indices + count, row_indices + k, int64_t{-1});
        std::fill(row_values + count, row_values + k, -kInfinity);
        counts_out[group] = count;
        if (count == 0) std::fill(row_parents, row_parents + refill_to, int64_t{-1});
      }
      batch_first = batch_last;
    }
  });
  return {indices, values, counts, parents};
}

// -- weights (resample, effective_sample_size) -----------------------------------------------------------

struct WeightScratch {
  std::vector<float> weights;
  std::vector<float> cdf;
  std::vector<float> uniforms;
};

// x rounded to an integer (to nearest, ties to even), for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction
// bits. Plain adds, unlike round(), which the default build's at::vec calls libm for, lane by lane.
inline FloatVec round_to_integer(const FloatVec& x) {
  const FloatVec shifter(12582912.0f);
  return (x + shifter) - shifter;
}

// 2^k for integer-valued k in [-126, 127]: the exponent field k + 127, placed by a multiply by 2^23.
inline FloatVec power_of_two(const FloatVec& k) {
  return at::vec::cast<float>(at::vec::convert_to_int_of_same_size((k + FloatVec(127.0f)) * FloatVec(8388608.0f)));
}

// e^x (x not NaN), within an ulp of the exact value: Cephes' expf, a Cody-Waite reduction x = n ln2 + r and
// a degree-7 polynomial in r. Only exactly rounded operations (no FMA: the build turns contraction off), so
// every build gives the same bits, and at the vector builds' speed (0.5 ns a lane, libm's expf 3 to 7).
inline FloatVec exp_same_in_every_build(const FloatVec& x) {
  // Beyond these e^x overflows (x > 88.73) or rounds to zero (x < -103.98), as it still does when clamped.
  const FloatVec clamped = at::vec::clamp(x, FloatVec(-104.0f), FloatVec(89.0f));
  const FloatVec n = round_to_integer(clamped * FloatVec(1.44269504088896341f));
  // ln 2 in two parts; n times the first, 0.693359375 (9 bits), is exact.
  const FloatVec r = (clamped - n * FloatVec(0.693359375f)) - n * FloatVec(-2.12194440e-4f);
  FloatVec p(1.9875691500e-4f);
  p = p * r + FloatVec(1.3981999507e-3f);
  p = p * r + FloatVec(8.3334519073e-3f);
  p = p * r + FloatVec(4.1665795894e-2f);
  p = p * r + FloatVec(1.6666665459e-1f);
  p = p * r + FloatVec(5.0000001201e-1f);
  const FloatVec e_r = (p * (r * r) + r) + FloatVec(1.0f);
  // 2^n (n in [-150, 128]) as two normal factors: the product rounds once, into the subnormals too.
  const FloatVec half = round_to_integer(n * FloatVec(0.5f));
  return e_r * power_of_two(half) * power_of_two(n - half);
}

// w = exp(lw - max) of one group into w[0, size), in fp32 as the reference computes it; returns the
// max, NaN when a log-weight is NaN (w then unset). A max of -inf (empty or all -inf) leaves zeros.
float group_weights(at::ScalarType dtype, const void* log_weights, int64_t begin, int64_t size, float* w) {
  to_float(dtype, log_weights, begin, size, w);
  float top = -kInfinity;
  for (int64_t i = 0; i < size; ++i) {
    if (std::isnan(w[i])) return w[i];
    top = std::max(top, w[i]);
  }
  const FloatVec shift(std::isfinite(top) ? top : 0.0f);
  for (int64_t start = 0; start < size; start += FloatVec::size()) {
    const int64_t lanes = std::min<int64_t>(FloatVec::size(), size - start);
    exp_same_in_every_build(FloatVec::loadu(w + start, lanes) - shift).store(w + start, lanes);
  }
  return top;
}

// Sum of values[0, size) in fp64, rounded once to fp32.
float sum_to_float(const float* values, int64_t size) {
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) sum += values[i];
  return static_cast<float>(sum);
}

// -- resample --------------------------------------------------------------------------------------------

// Uniforms u_first ... u_(first + count - 1) of the Philox stream into out: u_j is word j % 4 of the
// block of counter j / 4, drawn kCounterLanes blocks at a time by vec_stream.h's vectorised Philox.
void fill_uniforms(uint64_t seed, uint64_t first, int64_t count, float* out) {
  alignas(64) float units[4][kCounterLanes];
  const uint64_t end = first + static_cast<uint64_t>(count);
  for (uint64_t counter = first / 4; 4 * counter < end; counter += kCounterLanes) {
    philox_units(seed, counter, units);
    for (int64_t lane = 0; lane < kCounterLanes; ++lane) {
      for (uint64_t word = 0; word < 4; ++word) {
        const uint64_t position = 4 * (counter + static_cast<uint64_t>(lane)) + word;
        if (position >= first && position < end) out[position - first] = units[word][lane];
      }
    }
  }
}

// The CDF of `mass` in cdf[0, size): fp64 running sums rounded per entry (as torch's CPU cumsum), exactly
// 1 from the last entry with mass > 0 on, so no position below 1 lands past it. Returns that entry, or
// -1 when there is none.
int64_t build_cdf(const float* mass, int64_t size, float* cdf) {
  int64_t last = -1;
  for (int64_t i = 0; i < size; ++i) {
    if (mass[i] > 0.0f) last = i;
  }
  double running = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    running += mass[i];
    cdf[i] = i >= last ? 1.0f : static_cast<float>(running);
  }
  return last;
}

// The first candidate whose CDF value is above `position`; a position at or past the end (1.0 after
// rounding) takes the last candidate with mass.
int64_t draw(const float* cdf, int64_t size, int64_t last, float position) {
  const int64_t above = std::upper_bound(cdf, cdf + size, position) - cdf;
  return std::min(above, std::max<int64_t>(last, 0));
}

// Lowers `slot` to `value` if that is smaller (the lowest failing group is the one reported).
void lower_to(std::atomic<int64_t>& slot, int64_t value) {
  int64_t held = slot.load();
  while (value < held && !slot.compare_exchange_weak(held, value)) {
  }
}

at::Tensor resample(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets, int64_t num_samples,
                    int64_t method, int64_t seed) {
  check_resample_args(log_weights, offsets, num_samples, method);
  const Contiguous x = log_weights.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor ancestors = empty_output({groups.count, num_samples}, at::kLong);
  const at::ScalarType dtype = x->scalar_type();
  const void* data = x->const_data_ptr();
  int64_t* ancestors_out = ancestors.mutable_data_ptr<int64_t>();
  const float samples = static_cast<float>(num_samples);
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_nan_group{kNone};
  std::atomic<int64_t> first_dead_group{kNone};

  // A candidate costs its weight and CDF entry, a sample its uniform and binary search.
  const GroupCost cost{4.0, 16.0 * static_cast<double>(num_samples)};
  for_each_group(groups, cost, [&](int64_t group, int64_t begin, int64_t size) {
    WeightScratch& s = thread_scratch<WeightScratch>();
    float* w = room_for(s.weights, size);
    const float top = group_weights(dtype, data, begin, size, w);
    if (std::isnan(top) || top == -kInfinity) {
      lower_to(std::isnan(top) ? first_nan_group : first_dead_group, group);
      return;
    }
    const float total = sum_to_float(w, size);
    for (int64_t i = 0; i < size; ++i) w[i] /= total;
    float* cdf = room_for(s.cdf, size);
    float* uniforms = room_for(s.uniforms, num_samples);
    int64_t* out = ancestors_out + group * num_samples;
    const uint64_t first_position = static_cast<uint64_t>(group) * static_cast<uint64_t>(num_samples);

    if (method == 3) {  // residual: floor(N w) copies in index order, then multinomial on what is left
      int64_t filled = 0;
      for (int64_t i = 0; i < size; ++i) {
        const float expected = w[i] * samples;
        const float copies = std::floor(expected);
        for (int64_t c = 0; c < static_cast<int64_t>(copies) && filled < num_samples; ++c) out[filled++] = begin + i;
        w[i] = expected - copies;
      }
      const int64_t remainder = num_samples - filled;
      if (remainder == 0) return;
      const float residual_total = std::max(sum_to_float(w, size), 1e-30f);
      for (int64_t i = 0; i < size; ++i) w[i] /= residual_total;
      const int64_t last = build_cdf(w, size, cdf);
      fill_uniforms(static_cast<uint64_t>(seed), first_position, remainder, uniforms);
      for (int64_t i = 0; i < remainder; ++i) out[filled + i] = begin + draw(cdf, size, last, uniforms[i]);
      return;
    }
    const int64_t last = build_cdf(w, size, cdf);
    // Systematic draws take only u_0; the others one uniform per sample.
    fill_uniforms(static_cast<uint64_t>(seed), first_position, method == 1 ? 1 : num_samples, uniforms);
    for (int64_t i = 0; i < num_samples; ++i) {
      // fp32 (u + i) / N, as the reference computes it
      const float position = method == 0   ? uniforms[i]
                             : method == 1 ? (uniforms[0] + static_cast<float>(i)) / samples
                                           : (uniforms[i] + static_cast<float>(i)) / samples;
      out[i] = begin + draw(cdf, size, last, position);
    }
  });
  const int64_t nan_group = first_nan_group.load();
  const int64_t dead_group = first_dead_group.load();
  report_resample_errors(nan_group == kNone ? -1 : nan_group, dead_group == kNone ? -1 : dead_group);
  return ancestors;
}

// -- effective_sample_size -------------------------------------------------------------------------------

at::Tensor effective_sample_size(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets) {
  check_effective_sample_size_args(log_weights, offsets);
  const Contiguous x = log_weights.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor ess = empty_output({groups.count}, at::kFloat);
  const at::ScalarType dtype = x->scalar_type();
  const void* data = x->const_data_ptr();
  float* ess_out = ess.mutable_data_ptr<float>();

  for_each_group(groups, {2.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
    float* w = room_for(thread_scratch<WeightScratch>().weights, size);
    const float top = group_weights(dtype, data, begin, size, w);
    // No finite maximum (empty, all -inf, a NaN or a +inf): the reference reports 0.
    if (!std::isfinite(top)) {
      ess_out[group] = 0.0f;
      return;
    }
    double sum = 0.0;
    double squares = 0.0;
    for (int64_t i = 0; i < size; ++i) {
      sum += w[i];
      squares += w[i] * w[i];  // each square rounded to fp32 first, as the reference's w * w
    }
    const float total = static_cast<float>(sum);
    ess_out[group] = total * total / static_cast<float>(squares);
  });
  return ess;
}

// -- vote ------------------------------------------------------------------------------------------------

// One answer's tally.
struct Answer {
  int64_t first;  // its first voter
  int64_t last;   // its last voter: where its count is reached
  int64_t count;
  float sum;  // of its voters' scores, in candidate order (weighted mode)
};

struct VoteScratch {
  std::vector<float> scores;  // the group's, as fp32
  std::vector<Answer> answers;  // indexed by answer-key id, so in order of first voter
  KeyIds key_ids;
};

// The winning answer's first voter in one group (local index), or -1 without voters. Scores are fp32 as
// in the reference; `scores` holds them for this group, or is null (majority without scores).
int64_t group_winner(const int64_t* keys, const float* scores, const uint8_t* mask, int64_t size, int64_t mode,
                     VoteScratch& s) {
  const auto votes = [&](int64_t local) {
    return (mask == nullptr || mask[local]) && (mode == 0 || !std::isnan(scores[local]));
  };
  if (mode == 2) {  // max: the best single score, then its answer's first voter
    RankCode<float> best = kUnselectable<RankCode<float>>;
    for (int64_t local = 0; local < size; ++local) {
      if (votes(local)) best = std::min(best, rank_code(scores[local], local));
    }
    if (best == kUnselectable<RankCode<float>>) return -1;
    const int64_t top = local_of(best);
    for (int64_t local = 0; local < top; ++local) {
      if (votes(local) && keys[local] == keys[top]) return local;
    }
    return top;
  }
  Answer* answers = room_for(s.answers, size);
  s.key_ids.reset(size);
  int64_t distinct = 0;
  for (int64_t local = 0; local < size; ++local) {
    if (!votes(local)) continue;
    const int64_t id = s.key_ids.id(keys[local]);
    if (id == distinct) answers[distinct++] = Answer{local, local, 0, 0.0f};
    Answer& answer = answers[id];
    answer.last = local;
    ++answer.count;
    if (mode == 1) answer.sum += scores[local];
  }
  if (distinct == 0) return -1;
  // Answers are in order of their first voter, so keeping the incumbent on a tie keeps the earlier one.
  const Answer* winner = answers;
  for (int64_t id = 1; id < distinct; ++id) {
    const Answer& answer = answers[id];
    const bool better =
        mode == 0 ? answer.count > winner->count || (answer.count == winner->count && answer.last < winner->last)
                  : answer.sum > winner->sum || (std::isnan(winner->sum) && !std::isnan(answer.sum));
    if (better) winner = &answer;
  }
  return winner->first;
}

at::Tensor vote(const at::Tensor& answer_keys, const std::optional<at::Tensor>& scores,
                const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& mask, int64_t mode) {
  check_vote_args(answer_keys, scores, offsets, mask, mode);
  const Contiguous keys = answer_keys.expect_contiguous();
  const Contiguous score_values = contiguous_or_none(scores);
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous voters = contiguous_or_none(mask);
  const Groups groups = groups_of(*keys, *bounds);
  at::Tensor winners = empty_output({groups.count}, at::kLong);
  const int64_t* key_data = keys->const_data_ptr<int64_t>();
  const uint8_t* mask_data = flags_or_null(voters);
  int64_t* winners_out = winners.mutable_data_ptr<int64_t>();

  for_each_group(groups, {5.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
    VoteScratch& s = thread_scratch<VoteScratch>();
    const float* group_scores = nullptr;
    if (mode != 0) {  // majority ignores scores
      float* converted = room_for(s.scores, size);
      to_float(score_values->scalar_type(), score_values->const_data_ptr(), begin, size, converted);
      group_scores = converted;
    }
    const int64_t winner = group_winner(key_data + begin, group_scores,
                                        mask_data == nullptr ? nullptr : mask_data + begin, size, mode, s);
    winners_out[group] = winner < 0 ? -1 : groups.reported(begin, winner);
  });
  return winners;
}

// -- sequence_keys ---------------------------------------------------------------------------------------

constexpr uint64_t kTokenMultiplier = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kPositionMultiplier = 0xC2B2AE3D27D4EB4Full;

at::Tensor sequence_keys(const at::Tensor& token_ids, const at::Tensor& offsets) {
  check_sequence_keys_args(token_ids, offsets);
  const Contiguous tokens = token_ids.expect_contiguous();
  const Contiguous bounds = offsets.expect_contiguous();
  const Groups groups = groups_of(*tokens, *bounds);
  at::Tensor keys = empty_output({groups.count}, at::kLong);
  int64_t* keys_out = keys.mutable_data_ptr<int64_t>();

  AT_DISPATCH_V2(tokens->scalar_type(), "sequence_keys", AT_WRAP([&] {
    const scalar_t* token_data = tokens->const_data_ptr<scalar_t>();
    for_each_group(groups, {1.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
      // Wrapping uint64 arithmetic throughout; the token is sign-extended to int64 first.
      uint64_t sum = 0;
      for (int64_t position = 0; position < size; ++position) {
        const uint64_t token = static_cast<uint64_t>(static_cast<int64_t>(token_data[begin + position]));
        sum += mix64(token * kTokenMultiplier + static_cast<uint64_t>(position) * kPositionMultiplier + 1);
      }
      keys_out[group] = static_cast<int64_t>(mix64(static_cast<uint64_t>(size) ^ sum));
    });
  }), at::kLong, at::kInt);
  return keys;
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("segmented_topk", &fastsearch::cpu::segmented_topk);
  m.impl("beam_prune", &fastsearch::cpu::beam_prune);
  m.impl("resample", &fastsearch::cpu::resample);
  m.impl("effective_sample_size", &fastsearch::cpu::effective_sample_size);
  m.impl("vote", &fastsearch::cpu::vote);
  m.impl("sequence_keys", &fastsearch::cpu::sequence_keys);
}
