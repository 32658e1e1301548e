// CUDA kernels of the selection ops: segmented top-k, beam pruning, resampling, effective sample size,
// voting and sequence keys. Semantics: csrc/README.md ("Selection ops"); oracle: fastsearch/ops/select.py.
//
// One launch per op; one 256-thread block per group (sequence_keys: one warp per sequence).
//
// Order. A candidate's order key is an unsigned integer whose ascending order is best-first (the value's
// bits made orderable, complemented for "largest"; -0.0 is read as +0.0 so that the two tie). Candidates
// are laid out in index order and sorted with CUB's stable block radix sort, so equal keys keep the lower
// index first. Unselectable candidates (masked, finished, NaN) never get a key.
//
// Group sizes. A block sorts up to kCapacity = 2048 candidates in shared memory, with the fewest items
// per thread that hold its group (256, 512, 1024 or 2048: chosen per block at run time, so ragged groups
// of any mix of sizes need no host-side knowledge of the offsets). Larger groups take slower paths in the
// same kernel, read straight from global memory:
// - segmented_topk / beam_prune stream the group through the shared buffer: candidates that can still
//   make the cut are appended; when the buffer fills it is sorted and cut to its best kKeep = 1024 (later
//   candidates must beat the kKeep-th to enter); each round so yields the next kKeep of the order, and
//   rounds repeat until k are found. O(size) for k <= 1024.
// - beam_prune's dedup tests each candidate against its whole group (O(size^2 / 256) per round) instead of
//   a shared hash table.
// - vote (majority, weighted) compares each voter with its whole group (O(size^2 / 256)); max mode and
//   resample / effective_sample_size stream any group size.
#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/device_common.cuh"
#include "cuda/select_launchers.h"

namespace fastsearch::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxItemsPerThread = 8;
constexpr int kCapacity = kThreads * kMaxItemsPerThread;
constexpr int kKeep = kCapacity / 2;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr uint32_t kNoLocal = 0xFFFFFFFFu;
// Top-k blocks fit in 64 registers a thread, so that 4 blocks share an SM and 512 groups (a typical beam
// step) run in one wave on an H100.
constexpr int kSelectBlocksPerSm = 4;

// -- groups, values and keys ---------------------------------------------------------------------------

struct GroupRange {
  int64_t begin;
  int64_t size;
};

__device__ __forceinline__ GroupRange group_range(const GroupLayout& layout, int64_t group) {
  if (layout.offsets == nullptr) return GroupRange{group * layout.group_size, layout.group_size};
  // Offsets on the GPU are not validated (that would need a sync); clamping keeps every access in bounds.
  const int64_t begin = min(max(layout.offsets[group], int64_t{0}), layout.total);
  const int64_t end = min(max(layout.offsets[group + 1], begin), layout.total);
  return GroupRange{begin, end - begin};
}

// The index an op reports: row-local for dense groups, flat for ragged ones.
__device__ __forceinline__ int64_t reported_index(const GroupLayout& layout, int64_t begin, int64_t local) {
  return layout.offsets == nullptr ? local : begin + local;
}

// Scores are compared in fp32, float64 ones in fp64.
__device__ __forceinline__ double compared(double value) { return value; }
template <typename T>
__device__ __forceinline__ float compared(T value) {
  return to_float(value);
}

template <typename T>
using Compared = decltype(compared(std::declval<T>()));

template <typename T>
__device__ __forceinline__ float as_fp32(T value) {
  return static_cast<float>(compared(value));
}

template <typename T>
__device__ __forceinline__ T signed_infinity(bool negative) {
  return from_float<T>(negative ? -INFINITY : INFINITY);
}
template <>
__device__ __forceinline__ double signed_infinity<double>(bool negative) {
  return negative ? -static_cast<double>(INFINITY) : static_cast<double>(INFINITY);
}

// Bits whose unsigned order is the order of the (non-NaN) value.
__device__ __forceinline__ uint32_t ascending_bits(float value) {
  const uint32_t bits = __float_as_uint(value == 0.0f ? 0.0f : value);
  return bits ^ ((bits >> 31) != 0 ? 0xFFFFFFFFu : 0x80000000u);
}
__device__ __forceinline__ uint64_t ascending_bits(double value) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(value == 0.0 ? 0.0 : value));
  return bits ^ ((bits >> 63) != 0 ? ~uint64_t{0} : uint64_t{1} << 63);
}

template <typename Value>
__device__ __forceinline__ auto order_key(Value value, bool largest) {
  const auto bits = ascending_bits(value);
  return largest ? static_cast<decltype(bits)>(~bits) : bits;
}

template <typename T>
using OrderKey = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

// Above every key a non-NaN value can get, so padding sorts last.
template <typename Key>
__device__ __forceinline__ constexpr Key no_key() {
  return static_cast<Key>(~Key{0});
}

// A candidate in best-first order: its order key, then its group-local index.
template <typename Key>
struct Ranked {
  Key key;
  uint32_t local;
};

template <typename Key>
__device__ __forceinline__ bool precedes(const Ranked<Key>& a, const Ranked<Key>& b) {
  return a.key < b.key || (a.key == b.key && a.local < b.local);
}

// The splitmix64 finaliser (sequence keys, and the dedup hash table's slot choice).
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Calls body(TypeTag<T>{}) with the storage type T of `type`.
template <typename Body>
void dispatch_score_type(ScoreType type, Body&& body) {
  switch (type) {
    case ScoreType::kFloat32:
      body(TypeTag<float>{});
      break;
    case ScoreType::kFloat16:
      body(TypeTag<__half>{});
      break;
    case ScoreType::kBFloat16:
      body(TypeTag<__nv_bfloat16>{});
      break;
    case ScoreType::kFloat64:
      body(TypeTag<double>{});
      break;
  }
}

// Reads `value` from thread 0 into every thread. Ends with a barrier; `slot` is free again after it.
template <typename Value>
__device__ __forceinline__ Value broadcast(Value value, Value& slot) {
  if (threadIdx.x == 0) slot = value;
  __syncthreads();
  const Value result = slot;
  __syncthreads();
  return result;
}

// -- block-wide top-k over a group (segmented_topk, beam_prune) ----------------------------------------

template <typename Key, int kItems>
using BlockSort = cub::BlockRadixSort<Key, kThreads, kItems, uint32_t>;
using BlockCount = cub::BlockScan<int, kThreads>;

template <typename Key>
union SortTemps {
  typename BlockSort<Key, 1>::TempStorage items1;
  typename BlockSort<Key, 2>::TempStorage items2;
  typename BlockSort<Key, 4>::TempStorage items4;
  typename BlockSort<Key, 8>::TempStorage items8;
};

template <int kItems, typename Key>
__device__ __forceinline__ typename BlockSort<Key, kItems>::TempStorage& sort_temp(SortTemps<Key>& temps) {
  if constexpr (kItems == 1) {
    return temps.items1;
  } else if constexpr (kItems == 2) {
    return temps.items2;
  } else if constexpr (kItems == 4) {
    return temps.items4;
  } else {
    static_assert(kItems == kMaxItemsPerThread, "sort tiers are 1, 2, 4 and 8 items per thread");
    return temps.items8;
  }
}

// Sorts the first `count` (key, value) pairs of the arrays in place, stably, with kItems per thread
// (count <= kThreads * kItems). Each thread reads and writes the same ranks, so only the caller's
// accesses need the final barrier.
template <int kItems, typename Key>
__device__ void sort_pairs_with(Key* keys, uint32_t* values, int count, SortTemps<Key>& temps) {
  Key item_keys[kItems];
  uint32_t item_values[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int rank = threadIdx.x * kItems + j;
    item_keys[j] = rank < count ? keys[rank] : no_key<Key>();
    item_values[j] = rank < count ? values[rank] : kNoLocal;
  }
  BlockSort<Key, kItems>(sort_temp<kItems>(temps)).Sort(item_keys, item_values);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int rank = threadIdx.x * kItems + j;
    if (rank < count) {
      keys[rank] = item_keys[j];
      values[rank] = item_values[j];
    }
  }
  __syncthreads();
}

// Picks the smallest sort tier that holds `count` pairs (block-uniform).
template <typename Key>
__device__ void sort_pairs(Key* keys, uint32_t* values, int count, SortTemps<Key>& temps) {
  if (count == 0) return;
  if (count <= kThreads) {
    sort_pairs_with<1>(keys, values, count, temps);
  } else if (count <= 2 * kThreads) {
    sort_pairs_with<2>(keys, values, count, temps);
  } else if (count <= 4 * kThreads) {
    sort_pairs_with<4>(keys, values, count, temps);
  } else {
    sort_pairs_with<8>(keys, values, count, temps);
  }
}

template <typename Key>
struct SelectStorage {
  Key keys[kCapacity];  // staged candidates: order keys and group-local indices
  uint32_t locals[kCapacity];
  typename BlockCount::TempStorage count;
  union {
    SortTemps<Key> sort;
    uint32_t dedup_slots[2 * kCapacity];  // in use between a group's last sort and its emission
  };
};

// Open-addressing table over the ranks of a sorted staging buffer, by dedup key: every key's slot ends up
// holding its lowest (best) rank. Slots hold ranks; a rank's key is read through the buffer's locals.
struct DedupTable {
  uint32_t* slots;
  uint32_t mask;
  const int64_t* dedup_keys;
  int64_t begin;  // the group's first candidate
  const uint32_t* locals;

  __device__ int64_t key_of(uint32_t rank) const { return dedup_keys[begin + locals[rank]]; }
  __device__ uint32_t home(int64_t key) const {
    return static_cast<uint32_t>(mix64(static_cast<uint64_t>(key))) & mask;
  }

  // The slot a claimed key's ranks share never changes key, so a failed claim only has to compare keys.
  __device__ void insert(uint32_t rank) const {
    const int64_t key = key_of(rank);
    for (uint32_t slot = home(key);; slot = (slot + 1) & mask) {
      const uint32_t held = atomicCAS(&slots[slot], kNoLocal, rank);
      if (held == kNoLocal) return;
      if (key_of(held) == key) {
        atomicMin(&slots[slot], rank);
        return;
      }
    }
  }

  __device__ bool is_best(uint32_t rank) const {
    const int64_t key = key_of(rank);
    for (uint32_t slot = home(key);; slot = (slot + 1) & mask) {
      const uint32_t held = slots[slot];
      if (key_of(held) == key) return held == rank;
    }
  }
};

// Whether no other selectable candidate of the group with the same dedup key comes before `candidate`.
template <typename Key, typename Source>
__device__ bool best_of_dedup_key(const Source& source, const int64_t* dedup_keys, int64_t begin, int64_t size,
                                  const Ranked<Key>& candidate) {
  const int64_t own = dedup_keys[begin + candidate.local];
  for (int64_t other = 0; other < size; ++other) {
    if (other == candidate.local || dedup_keys[begin + other] != own) continue;
    Ranked<Key> rival{no_key<Key>(), static_cast<uint32_t>(other)};
    if (source.key(begin + other, rival.key) && precedes(rival, candidate)) return false;
  }
  return true;
}

// Hands the group's best selectable candidates, best first, to sink.emit(position, local) for positions
// < k and returns how many there were (at most k). Source::key(flat, key) says whether a candidate is
// selectable and gives its order key. With dedup_keys only the best candidate of each key counts.
template <typename Key, typename Source, typename Sink>
__device__ int64_t select_best(SelectStorage<Key>& s, const Source& source, int64_t begin, int64_t size, int64_t k,
                               const int64_t* dedup_keys, const Sink& sink) {
  // A group that fits is staged whole, so one sort orders it and a hash table over it dedups.
  const bool whole = size <= kCapacity;
  const bool dedup_by_table = dedup_keys != nullptr && whole;
  const bool dedup_by_scan = dedup_keys != nullptr && !whole;
  int64_t emitted = 0;
  Ranked<Key> after{};  // the last candidate ordered by the previous round
  bool have_after = false;
  for (;;) {
    int fill = 0;
    bool cut = false;
    Ranked<Key> worst{};  // once cut: the kKeep-th best staged, which a newcomer must beat
    for (int64_t tile = 0; tile < size; tile += kThreads) {
      Ranked<Key> candidate{no_key<Key>(), static_cast<uint32_t>(tile + threadIdx.x)};
      bool take = tile + threadIdx.x < size && source.key(begin + candidate.local, candidate.key);
      take = take && (!have_after || precedes(after, candidate)) && (!cut || precedes(candidate, worst));
      take = take && (!dedup_by_scan || best_of_dedup_key(source, dedup_keys, begin, size, candidate));
      int position, taken;
      BlockCount(s.count).ExclusiveSum(take ? 1 : 0, position, taken);
      if (fill + taken > kCapacity) {
        sort_pairs(s.keys, s.locals, fill, s.sort);
        fill = kKeep;
        cut = true;
        worst = Ranked<Key>{s.keys[kKeep - 1], s.locals[kKeep - 1]};
      }
      if (take) {
        s.keys[fill + position] = candidate.key;
        s.locals[fill + position] = candidate.local;
      }
      fill += taken;
      __syncthreads();
    }
    sort_pairs(s.keys, s.locals, fill, s.sort);

    DedupTable table{s.dedup_slots, 0, dedup_keys, begin, s.locals};
    if (dedup_by_table) {
      uint32_t slots = 2;  // a power of two at least twice the staged count
      while (slots < 2u * static_cast<uint32_t>(fill)) slots *= 2;
      table.mask = slots - 1;
      for (uint32_t slot = threadIdx.x; slot < slots; slot += kThreads) s.dedup_slots[slot] = kNoLocal;
      __syncthreads();
      for (int rank = threadIdx.x; rank < fill; rank += kThreads) table.insert(rank);
      __syncthreads();
    }

    // After a cut only the first kKeep staged are known to be the best of what is left.
    const int exact = cut ? kKeep : fill;
    for (int base = 0; base < exact; base += kThreads) {
      const int rank = base + threadIdx.x;
      const bool keep = rank < exact && (!dedup_by_table || table.is_best(rank));
      int position, kept;
      BlockCount(s.count).ExclusiveSum(keep ? 1 : 0, position, kept);
      if (keep && emitted + position < k) sink.emit(emitted + position, s.locals[rank]);
      emitted += kept;
      __syncthreads();
    }
    if (!cut || emitted >= k) return min(emitted, k);
    after = Ranked<Key>{s.keys[exact - 1], s.locals[exact - 1]};
    have_after = true;
    __syncthreads();
  }
}

// -- segmented_topk ------------------------------------------------------------------------------------

template <typename T>
struct TopkCandidates {
  const T* scores;
  const bool* mask;
  bool largest;

  __device__ bool key(int64_t flat, OrderKey<T>& key) const {
    if (mask != nullptr && !mask[flat]) return false;
    const Compared<T> value = compared(scores[flat]);
    if (isnan(value)) return false;
    key = order_key(value, largest);
    return true;
  }
};

template <typename T>
struct TopkSink {
  const T* scores;
  T* values;  // this group's row
  int64_t* indices;
  int64_t begin;
  GroupLayout layout;

  __device__ void emit(int64_t position, uint32_t local) const {
    values[position] = scores[begin + local];
    indices[position] = reported_index(layout, begin, local);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kSelectBlocksPerSm)
    segmented_topk_kernel(const T* __restrict__ scores, const bool* __restrict__ mask, GroupLayout layout, int64_t k,
                          bool largest, T* __restrict__ values, int64_t* __restrict__ indices) {
  __shared__ SelectStorage<OrderKey<T>> storage;
  const int64_t group = blockIdx.x;
  const GroupRange range = group_range(layout, group);
  T* row_values = values + group * k;
  int64_t* row_indices = indices + group * k;
  const int64_t count =
      select_best(storage, TopkCandidates<T>{scores, mask, largest}, range.begin, range.size, k, nullptr,
                  TopkSink<T>{scores, row_values, row_indices, range.begin, layout});
  const T pad = signed_infinity<T>(largest);
  for (int64_t position = count + threadIdx.x; position < k; position += kThreads) {
    row_values[position] = pad;
    row_indices[position] = -1;
  }
}

// -- beam_prune ----------------------------------------------------------------------------------------

// length ** penalty as torch computes lengths.float() ** p: the common exponents that torch special-cases
// on CPU and CUDA (1: the length itself, 2: its square, 0.5: sqrtf) get the same exact arithmetic, so the
// ranking matches bit for bit; other exponents use powf.
enum class PenaltyForm : int32_t { kNone, kLength, kSquare, kSquareRoot, kPower };

struct LengthPenalty {
  PenaltyForm form;
  float exponent;
  LengthType type;
  const void* lengths;

  __device__ float length(int64_t flat) const {
    switch (type) {
      case LengthType::kInt64:
        return static_cast<float>(static_cast<const int64_t*>(lengths)[flat]);
      case LengthType::kInt32:
        return static_cast<float>(static_cast<const int32_t*>(lengths)[flat]);
      case LengthType::kInt16:
        return static_cast<float>(static_cast<const int16_t*>(lengths)[flat]);
      case LengthType::kInt8:
        return static_cast<float>(static_cast<const int8_t*>(lengths)[flat]);
      case LengthType::kUInt8:
        return static_cast<float>(static_cast<const uint8_t*>(lengths)[flat]);
      case LengthType::kFloat32:
        return static_cast<const float*>(lengths)[flat];
      default:
        return static_cast<float>(static_cast<const double*>(lengths)[flat]);
    }
  }

  __device__ float divisor(int64_t flat) const {
    const float value = length(flat);
    switch (form) {
      case PenaltyForm::kLength:
        return value;
      case PenaltyForm::kSquare:
        return value * value;
      case PenaltyForm::kSquareRoot:
        return sqrtf(value);
      default:
        return powf(value, exponent);
    }
  }
};

LengthPenalty length_penalty_of(LengthType type, const void* lengths, double penalty) {
  PenaltyForm form = PenaltyForm::kPower;
  if (lengths == nullptr || penalty == 0.0) {
    form = PenaltyForm::kNone;
  } else if (penalty == 1.0) {
    form = PenaltyForm::kLength;
  } else if (penalty == 2.0) {
    form = PenaltyForm::kSquare;
  } else if (penalty == 0.5) {
    form = PenaltyForm::kSquareRoot;
  }
  return LengthPenalty{form, static_cast<float>(penalty), type, lengths};
}

template <typename T>
struct BeamCandidates {
  const T* scores;
  const bool* finished;
  LengthPenalty penalty;

  __device__ float adjusted(int64_t flat) const {
    const float score = as_fp32(scores[flat]);
    return penalty.form == PenaltyForm::kNone ? score : score / penalty.divisor(flat);
  }

  __device__ bool key(int64_t flat, uint32_t& key) const {
    if (finished != nullptr && finished[flat]) return false;
    const float value = adjusted(flat);
    if (isnan(value)) return false;
    key = order_key(value, true);
    return true;
  }
};

template <typename T>
struct BeamSink {
  BeamCandidates<T> candidates;
  int64_t* indices;  // this group's row
  float* values;
  int64_t begin;
  GroupLayout layout;

  __device__ void emit(int64_t position, uint32_t local) const {
    indices[position] = reported_index(layout, begin, local);
    values[position] = candidates.adjusted(begin + local);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kSelectBlocksPerSm)
    beam_prune_kernel(BeamCandidates<T> candidates, GroupLayout layout, int64_t k,
                      const int64_t* __restrict__ dedup_keys, int64_t refill_to, int64_t* __restrict__ indices,
                      float* __restrict__ values, int64_t* __restrict__ counts, int64_t* __restrict__ parents) {
  __shared__ SelectStorage<uint32_t> storage;
  const int64_t group = blockIdx.x;
  const GroupRange range = group_range(layout, group);
  int64_t* row_indices = indices + group * k;
  float* row_values = values + group * k;
  const int64_t count = select_best(storage, candidates, range.begin, range.size, k, dedup_keys,
                                    BeamSink<T>{candidates, row_indices, row_values, range.begin, layout});
  for (int64_t position = count + threadIdx.x; position < k; position += kThreads) {
    row_indices[position] = -1;
    row_values[position] = -INFINITY;
  }
  if (threadIdx.x == 0) counts[group] = count;
  // The barrier makes this block's writes of row_indices visible to all its threads.
  __syncthreads();
  for (int64_t slot = threadIdx.x; slot < refill_to; slot += kThreads) {
    parents[group * refill_to + slot] = count > 0 ? row_indices[slot % count] : -1;
  }
}

// -- vote ----------------------------------------------------------------------------------------------

// Votes compare and sum scores in fp32 on every backend, float64 ones rounded to fp32 first (csrc/README.md,
// vote), unlike the top-k ops, which compare float64 in fp64.
template <typename T>
struct Voters {
  const int64_t* keys;
  const T* scores;
  const bool* mask;
  VoteMode mode;

  __device__ bool votes(int64_t flat) const {
    if (mask != nullptr && !mask[flat]) return false;
    return mode == VoteMode::kMajority || !isnan(as_fp32(scores[flat]));
  }
};

// One answer's tally; first == kNoLocal for none.
struct Answer {
  uint32_t first;  // its first voter
  uint32_t last;   // its last voter: where its count is reached
  uint32_t count;
  float sum;  // of its voters' scores (weighted mode)
};

constexpr Answer kNoAnswer{kNoLocal, 0, 0, 0.0f};

// The better answer: majority by count, then the count reached first; weighted by sum (a NaN sum loses),
// then the first voter seen first. Distinct answers never tie.
struct BetterAnswer {
  VoteMode mode;

  __device__ Answer operator()(const Answer& a, const Answer& b) const {
    if (a.first == kNoLocal) return b;
    if (b.first == kNoLocal) return a;
    if (mode == VoteMode::kMajority) {
      if (a.count != b.count) return a.count > b.count ? a : b;
      return a.last < b.last ? a : b;
    }
    if (a.sum > b.sum || (isnan(b.sum) && !isnan(a.sum))) return a;
    if (b.sum > a.sum || (isnan(a.sum) && !isnan(b.sum))) return b;
    return a.first < b.first ? a : b;
  }
};

// Partial tally of a run of equal answer keys, for a segmented scan: a run restarts at each head.
struct RunTally {
  uint32_t head;
  Answer answer;
};

struct ExtendRun {
  __device__ RunTally operator()(const RunTally& a, const RunTally& b) const {
    if (b.head) return b;
    return RunTally{a.head, Answer{min(a.answer.first, b.answer.first), max(a.answer.last, b.answer.last),
                                   a.answer.count + b.answer.count, a.answer.sum + b.answer.sum}};
  }
};

using BlockAnswer = cub::BlockReduce<Answer, kThreads>;
using BlockFirst = cub::BlockReduce<uint32_t, kThreads>;

template <typename Key>
using BlockRanked = cub::BlockReduce<Ranked<Key>, kThreads>;

template <typename T>
struct VoteStorage {
  union {
    SortTemps<uint64_t> sort;
    typename cub::BlockDiscontinuity<uint64_t, kThreads>::TempStorage runs;
    typename cub::BlockScan<RunTally, kThreads>::TempStorage tally;
    typename BlockAnswer::TempStorage answer;
    typename BlockRanked<uint32_t>::TempStorage best;
    typename BlockFirst::TempStorage first;
  };
  uint32_t broadcast;
};

// Majority / weighted tally of a group that fits: sort the candidates by answer key (stable, so each
// answer's voters stay in index order), find the runs of equal keys, tally each run with a segmented scan.
// Non-voters ride along with a zero tally. Returns the winner in thread 0.
template <int kItems, typename T>
__device__ Answer tally_sorted(VoteStorage<T>& s, const Voters<T>& voters, int64_t begin, int64_t size) {
  uint64_t keys[kItems];
  uint32_t locals[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int local = threadIdx.x * kItems + j;
    keys[j] = local < size ? static_cast<uint64_t>(voters.keys[begin + local]) : no_key<uint64_t>();
    locals[j] = local;
  }
  BlockSort<uint64_t, kItems>(sort_temp<kItems>(s.sort)).Sort(keys, locals);
  __syncthreads();
  int heads[kItems];
  int tails[kItems];
  cub::BlockDiscontinuity<uint64_t, kThreads>(s.runs)
      .FlagHeadsAndTails(heads, tails, keys, [](uint64_t a, uint64_t b) { return a != b; });
  __syncthreads();
  RunTally runs[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const uint32_t local = locals[j];
    const bool votes = local < size && voters.votes(begin + local);
    const float score = votes && voters.mode == VoteMode::kWeighted ? as_fp32(voters.scores[begin + local]) : 0.0f;
    runs[j].head = static_cast<uint32_t>(heads[j]);
    runs[j].answer = kNoAnswer;
    if (votes) runs[j].answer = Answer{local, local, 1, score};
  }
  cub::BlockScan<RunTally, kThreads>(s.tally).InclusiveScan(runs, runs, ExtendRun{});
  __syncthreads();
  const BetterAnswer better{voters.mode};
  Answer best = kNoAnswer;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (tails[j]) best = better(best, runs[j].answer);
  }
  return BlockAnswer(s.answer).Reduce(best, better);
}

// Majority / weighted tally of a group too large to sort in shared memory: each answer is tallied by the
// voter that closes it (majority: its last voter; weighted: its first, summing in index order).
template <typename T>
__device__ Answer tally_scan(VoteStorage<T>& s, const Voters<T>& voters, int64_t begin, int64_t size) {
  const BetterAnswer better{voters.mode};
  const bool majority = voters.mode == VoteMode::kMajority;
  Answer best = kNoAnswer;
  for (int64_t local = threadIdx.x; local < size; local += kThreads) {
    if (!voters.votes(begin + local)) continue;
    const int64_t key = voters.keys[begin + local];
    Answer answer{static_cast<uint32_t>(local), static_cast<uint32_t>(local), 0, 0.0f};
    bool closes = true;
    for (int64_t other = 0; other < size && closes; ++other) {
      if (voters.keys[begin + other] != key || !voters.votes(begin + other)) continue;
      if (majority) {
        closes = other <= local;
        answer.first = min(answer.first, static_cast<uint32_t>(other));
        ++answer.count;
      } else {
        closes = other >= local;
        answer.sum += as_fp32(voters.scores[begin + other]);
      }
    }
    if (closes) best = better(best, answer);
  }
  return BlockAnswer(s.answer).Reduce(best, better);
}

// Max mode, any group size: the best single score (lower index on ties), then its answer's first voter.
template <typename T>
__device__ uint32_t best_single_vote(VoteStorage<T>& s, const Voters<T>& voters, int64_t begin, int64_t size) {
  using Key = uint32_t;  // the order of the fp32 score, float64 included
  const auto earlier = [](const Ranked<Key>& a, const Ranked<Key>& b) { return precedes(a, b) ? a : b; };
  Ranked<Key> best{no_key<Key>(), kNoLocal};
  for (int64_t local = threadIdx.x; local < size; local += kThreads) {
    if (!voters.votes(begin + local)) continue;
    const Ranked<Key> candidate{order_key(as_fp32(voters.scores[begin + local]), true),
                                static_cast<uint32_t>(local)};
    best = earlier(best, candidate);
  }
  const uint32_t top = broadcast(BlockRanked<Key>(s.best).Reduce(best, earlier).local, s.broadcast);
  if (top == kNoLocal) return kNoLocal;
  const int64_t key = voters.keys[begin + top];
  uint32_t first = top;
  for (int64_t local = threadIdx.x; local < top; local += kThreads) {
    if (voters.keys[begin + local] == key && voters.votes(begin + local)) {
      first = min(first, static_cast<uint32_t>(local));
    }
  }
  return BlockFirst(s.first).Reduce(first, [](uint32_t a, uint32_t b) { return min(a, b); });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    vote_kernel(Voters<T> voters, GroupLayout layout, int64_t* __restrict__ winners) {
  __shared__ VoteStorage<T> storage;
  const int64_t group = blockIdx.x;
  const GroupRange range = group_range(layout, group);
  uint32_t winner;
  if (voters.mode == VoteMode::kMax) {
    winner = best_single_vote(storage, voters, range.begin, range.size);
  } else if (range.size <= kThreads) {
    winner = tally_sorted<1>(storage, voters, range.begin, range.size).first;
  } else if (range.size <= 2 * kThreads) {
    winner = tally_sorted<2>(storage, voters, range.begin, range.size).first;
  } else if (range.size <= 4 * kThreads) {
    winner = tally_sorted<4>(storage, voters, range.begin, range.size).first;
  } else if (range.size <= kCapacity) {
    winner = tally_sorted<kMaxItemsPerThread>(storage, voters, range.begin, range.size).first;
  } else {
    winner = tally_scan(storage, voters, range.begin, range.size).first;
  }
  if (threadIdx.x == 0) winners[group] = winner == kNoLocal ? -1 : reported_index(layout, range.begin, winner);
}

// -- resample, effective_sample_size ------------------------------------------------------------------
//
// Any group size: a block streams its group for the maximum, the normaliser and the CDF's end points,
// then walks the group in tiles of kTile candidates, building each tile's CDF in shared memory (a block
// scan plus the previous tiles' carry) and placing there every sample whose position falls in the tile's
// CDF range. Each pass re-reads the group, which for small groups comes from L1.

constexpr int kTileItemsPerThread = 4;
constexpr int kTile = kThreads * kTileItemsPerThread;

// max that lets a NaN through, like torch.max.
struct MaxKeepingNan {
  __device__ float operator()(float a, float b) const { return isnan(a) || a > b ? a : b; }
};

template <typename T>
__device__ float group_max(const T* log_weights, int64_t size, cub::BlockReduce<float, kThreads>::TempStorage& temp,
                           float& slot) {
  float top = -INFINITY;
  for (int64_t local = threadIdx.x; local < size; local += kThreads) {
    top = MaxKeepingNan{}(top, as_fp32(log_weights[local]));
  }
  return broadcast(cub::BlockReduce<float, kThreads>(temp).Reduce(top, MaxKeepingNan{}), slot);
}

// Sums of w and w^2, w = exp(lw - max).
struct WeightSums {
  float weights;
  float squares;
};

struct AddWeightSums {
  __device__ WeightSums operator()(const WeightSums& a, const WeightSums& b) const {
    return WeightSums{a.weights + b.weights, a.squares + b.squares};
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    effective_sample_size_kernel(const T* __restrict__ log_weights, GroupLayout layout, float* __restrict__ ess) {
  __shared__ union {
    cub::BlockReduce<float, kThreads>::TempStorage max;
    cub::BlockReduce<WeightSums, kThreads>::TempStorage sums;
  } temp;
  __shared__ float top_slot;
  const int64_t group = blockIdx.x;
  const GroupRange range = group_range(layout, group);
  const T* weights_in = log_weights + range.begin;
  const float top = group_max(weights_in, range.size, temp.max, top_slot);
  // No finite maximum: NaN for a group holding a NaN or a +inf (not a weight; the max lets NaN
  // through), 0 for an empty or all -inf group, as the reference reports.
  if (!isfinite(top)) {
    if (threadIdx.x == 0) ess[group] = top == -INFINITY ? 0.0f : NAN;
    return;
  }
  WeightSums sums{0.0f, 0.0f};
  for (int64_t local = threadIdx.x; local < range.size; local += kThreads) {
    const float weight = expf(as_fp32(weights_in[local]) - top);
    sums.weights += weight;
    sums.squares += weight * weight;
  }
  sums = cub::BlockReduce<WeightSums, kThreads>(temp.sums).Reduce(sums, AddWeightSums{});
  if (threadIdx.x == 0) ess[group] = sums.weights * sums.weights / sums.squares;
}

// The normalised weights of one group: w_j = exp(lw_j - shift) / total.
template <typename T>
struct GroupWeights {
  const T* log_weights;  // from the group's first candidate
  float shift;
  float total;

  __device__ float unnormalised(int64_t local) const { return expf(as_fp32(log_weights[local]) - shift); }
  __device__ float at(int64_t local) const { return unnormalised(local) / total; }
};

// What the draws need to know about a whole group before its first tile.
struct WeightStats {
  int32_t last;  // the last candidate with w > 0: the CDF is 1 from there on
  int64_t copies;  // residual: sum of floor(N w)
  float residual_sum;  // residual: sum of N w - floor(N w)
  int32_t residual_last;  // residual: the last candidate with a residual > 0, or -1
};

struct CombineWeightStats {
  __device__ WeightStats operator()(const WeightStats& a, const WeightStats& b) const {
    return WeightStats{max(a.last, b.last), a.copies + b.copies, a.residual_sum + b.residual_sum,
                       max(a.residual_last, b.residual_last)};
  }
};

struct ResampleStorage {
  union {
    cub::BlockReduce<float, kThreads>::TempStorage value;
    cub::BlockReduce<WeightStats, kThreads>::TempStorage stats;
    cub::BlockScan<float, kThreads>::TempStorage mass;
    cub::BlockScan<int64_t, kThreads>::TempStorage copies;
  } temp;
  float cdf[kTile];  // this tile's CDF (residual: of the normalised residuals)
  int64_t copies[kTile];  // residual: this tile's inclusive prefix sum of floor(N w)
  float float_slot;
  WeightStats stats_slot;
};

// Uniform u_position of the Philox stream: word position % 4 of block position / 4.
__device__ __forceinline__ float stream_uniform(uint64_t seed, uint64_t position) {
  return uint_to_unit_open(philox_block(seed, position / 4).r[position % 4]);
}

// The first of values[0, count) above `threshold` (the caller knows values[count - 1] is).
template <typename Value>
__device__ __forceinline__ int first_above(const Value* values, int count, Value threshold) {
  int low = 0;
  int high = count - 1;
  while (low < high) {
    const int mid = (low + high) / 2;
    if (values[mid] > threshold) {
      high = mid;
    } else {
      low = mid + 1;
    }
  }
  return low;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resample_kernel(const T* __restrict__ log_weights, GroupLayout layout, int64_t num_samples,
                    ResampleMethod method, uint64_t seed, int64_t* __restrict__ ancestors,
                    unsigned long long* __restrict__ status) {
  __shared__ ResampleStorage s;
  const int64_t group = blockIdx.x;
  const GroupRange range = group_range(layout, group);
  const T* weights_in = log_weights + range.begin;
  const float top = group_max(weights_in, range.size, s.temp.value, s.float_slot);
  // status[0]: a NaN or +inf log-weight (not a weight); status[1]: no finite log-weight (empty, all -inf).
  if (!isfinite(top)) {
    if (threadIdx.x == 0) atomicMin(&status[top == -INFINITY ? 1 : 0], static_cast<unsigned long long>(group));
    return;
  }
  GroupWeights<T> weights{weights_in, isfinite(top) ? top : 0.0f, 0.0f};
  float total = 0.0f;
  for (int64_t local = threadIdx.x; local < range.size; local += kThreads) total += weights.unnormalised(local);
  weights.total = broadcast(cub::BlockReduce<float, kThreads>(s.temp.value).Sum(total), s.float_slot);

  const bool residual = method == ResampleMethod::kResidual;
  const float samples = static_cast<float>(num_samples);
  WeightStats stats{-1, 0, 0.0f, -1};
  for (int64_t local = threadIdx.x; local < range.size; local += kThreads) {
    const float weight = weights.at(local);
    if (weight > 0.0f) stats.last = static_cast<int32_t>(local);
    if (residual) {
      const float expected = weight * samples;
      const float copies = floorf(expected);
      stats.copies += static_cast<int64_t>(copies);
      stats.residual_sum += expected - copies;
      if (expected - copies > 0.0f) stats.residual_last = static_cast<int32_t>(local);
    }
  }
  stats = broadcast(cub::BlockReduce<WeightStats, kThreads>(s.temp.stats).Reduce(stats, CombineWeightStats{}),
                    s.stats_slot);

  // Residual: slots [0, deterministic) take the floor copies in index order, the rest are multinomial
  // draws from the residuals with uniforms u_0, u_1, ... of the group.
  const int64_t deterministic = residual ? min(stats.copies, num_samples) : 0;
  const float residual_total = fmaxf(stats.residual_sum, 1e-30f);
  const int32_t cdf_last = residual ? stats.residual_last : stats.last;
  const uint64_t first_position = static_cast<uint64_t>(group) * static_cast<uint64_t>(num_samples);
  const float systematic_start = stream_uniform(seed, first_position);
  int64_t* out = ancestors + group * num_samples;

  float cdf_before = 0.0f;  // the CDF at the end of the previous tile
  int64_t copies_before = 0;
  for (int64_t tile = 0; tile < range.size; tile += kTile) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kTile), range.size - tile));
    float mass[kTileItemsPerThread];
    int64_t copies[kTileItemsPerThread];
#pragma unroll
    for (int j = 0; j < kTileItemsPerThread; ++j) {
      const int item = threadIdx.x * kTileItemsPerThread + j;
      const float weight = item < count ? weights.at(tile + item) : 0.0f;
      if (residual) {
        const float expected = weight * samples;
        const float floor_copies = floorf(expected);
        mass[j] = (expected - floor_copies) / residual_total;
        copies[j] = static_cast<int64_t>(floor_copies);
      } else {
        mass[j] = weight;
      }
    }
    float tile_mass;
    cub::BlockScan<float, kThreads>(s.temp.mass).InclusiveSum(mass, mass, tile_mass);
#pragma unroll
    for (int j = 0; j < kTileItemsPerThread; ++j) {
      const int item = threadIdx.x * kTileItemsPerThread + j;
      // From the last candidate with mass on, the CDF is exactly 1: no draw can land past it.
      s.cdf[item] = tile + item >= cdf_last ? 1.0f : cdf_before + mass[j];
    }
    int64_t tile_copies = 0;
    if (residual) {
      __syncthreads();
      cub::BlockScan<int64_t, kThreads>(s.temp.copies).InclusiveSum(copies, copies, tile_copies);
#pragma unroll
      for (int j = 0; j < kTileItemsPerThread; ++j) s.copies[threadIdx.x * kTileItemsPerThread + j] = copies[j];
    }
    __syncthreads();

    // Slots whose position is in [cdf_before, cdf_after) draw a candidate of this tile.
    const float cdf_after = s.cdf[count - 1];
    for (int64_t slot = threadIdx.x; slot < num_samples; slot += kThreads) {
      if (slot < deterministic) {
        if (slot >= copies_before && slot < copies_before + tile_copies) {
          out[slot] = range.begin + tile + first_above(s.copies, count, slot - copies_before);
        }
        continue;
      }
      float position;
      switch (method) {
        case ResampleMethod::kSystematic:
          position = (systematic_start + static_cast<float>(slot)) / samples;
          break;
        case ResampleMethod::kStratified:
          position = (stream_uniform(seed, first_position + slot) + static_cast<float>(slot)) / samples;
          break;
        default:  // multinomial; residual draws use u_0, u_1, ...
          position = stream_uniform(seed, first_position + slot - deterministic);
          break;
      }
      if (position >= 1.0f) {  // rounding in (u + i) / N: the last candidate with mass
        if (tile == 0) out[slot] = range.begin + max(cdf_last, 0);
      } else if (position >= cdf_before && position < cdf_after) {
        out[slot] = range.begin + tile + first_above(s.cdf, count, position);
      }
    }
    cdf_before = cdf_after;
    copies_before += tile_copies;
    __syncthreads();
  }
}

// -- sequence_keys -------------------------------------------------------------------------------------

constexpr uint64_t kTokenMultiplier = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kPositionMultiplier = 0xC2B2AE3D27D4EB4Full;

// One warp per sequence; the sum of mixed terms wraps, so any summation order gives the same bits.
template <typename Token>
__global__ void __launch_bounds__(kThreads)
    sequence_keys_kernel(const Token* __restrict__ tokens, const int64_t* __restrict__ offsets, int64_t sequences,
                         int64_t total, int64_t* __restrict__ keys) {
  const int64_t sequence = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (sequence >= sequences) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int64_t begin = min(max(offsets[sequence], int64_t{0}), total);
  const int64_t length = min(max(offsets[sequence + 1], begin), total) - begin;
  unsigned long long sum = 0;
  for (int64_t position = lane; position < length; position += 32) {
    const uint64_t token = static_cast<uint64_t>(static_cast<int64_t>(tokens[begin + position]));
    sum += mix64(token * kTokenMultiplier + static_cast<uint64_t>(position) * kPositionMultiplier + 1);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
  if (lane == 0) keys[sequence] = static_cast<int64_t>(mix64(static_cast<uint64_t>(length) ^ sum));
}

unsigned int group_blocks(const GroupLayout& layout) { return static_cast<unsigned int>(layout.groups); }

}  // namespace

void launch_segmented_topk(ScoreType dtype, const void* scores, const bool* mask, GroupLayout layout, int64_t k,
                           bool largest, void* values, int64_t* indices, cudaStream_t stream) {
  if (layout.groups == 0) return;
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segmented_topk_kernel<T><<<group_blocks(layout), kThreads, 0, stream>>>(
        static_cast<const T*>(scores), mask, layout, k, largest, static_cast<T*>(values), indices);
  });
}

void launch_beam_prune(ScoreType dtype, const void* scores, GroupLayout layout, int64_t k, const bool* finished,
                       LengthType length_type, const void* lengths, double length_penalty, const int64_t* dedup_keys,
                       int64_t refill_to, int64_t* indices, float* values, int64_t* counts, int64_t* parents,
                       cudaStream_t stream) {
  if (layout.groups == 0) return;
  const LengthPenalty penalty = length_penalty_of(length_type, lengths, length_penalty);
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const BeamCandidates<T> candidates{static_cast<const T*>(scores), finished, penalty};
    beam_prune_kernel<T><<<group_blocks(layout), kThreads, 0, stream>>>(candidates, layout, k, dedup_keys,
                                                                        refill_to, indices, values, counts, parents);
  });
}

void launch_resample(ScoreType dtype, const void* log_weights, GroupLayout layout, int64_t num_samples,
                     ResampleMethod method, uint64_t seed, int64_t* ancestors, int64_t* status, cudaStream_t stream) {
  // All ones: -1 read as int64, above every group index read as unsigned (the kernel keeps minima).
  FASTSEARCH_CUDA_OR_RETURN(cudaMemsetAsync(status, 0xFF, 2 * sizeof(int64_t), stream));
  if (layout.groups == 0) return;
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    resample_kernel<T><<<group_blocks(layout), kThreads, 0, stream>>>(
        static_cast<const T*>(log_weights), layout, num_samples, method, seed, ancestors,
        reinterpret_cast<unsigned long long*>(status));
  });
}

void launch_effective_sample_size(ScoreType dtype, const void* log_weights, GroupLayout layout, float* ess,
                                  cudaStream_t stream) {
  if (layout.groups == 0) return;
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    effective_sample_size_kernel<T>
        <<<group_blocks(layout), kThreads, 0, stream>>>(static_cast<const T*>(log_weights), layout, ess);
  });
}

void launch_vote(const int64_t* answer_keys, ScoreType score_type, const void* scores, const bool* mask,
                 GroupLayout layout, VoteMode mode, int64_t* winners, cudaStream_t stream) {
  if (layout.groups == 0) return;
  dispatch_score_type(score_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Voters<T> voters{answer_keys, static_cast<const T*>(scores), mask, mode};
    vote_kernel<T><<<group_blocks(layout), kThreads, 0, stream>>>(voters, layout, winners);
  });
}

void launch_sequence_keys(const void* token_ids, bool int32_tokens, const int64_t* offsets, int64_t sequences,
                          int64_t total, int64_t* keys, cudaStream_t stream) {
  if (sequences == 0) return;
  const unsigned int blocks = blocks_for(sequences, kWarpsPerBlock);
  if (int32_tokens) {
    sequence_keys_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(static_cast<const int32_t*>(token_ids), offsets,
                                                                     sequences, total, keys);
  } else {
    sequence_keys_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(static_cast<const int64_t*>(token_ids), offsets,
                                                                     sequences, total, keys);
  }
}

}  // namespace fastsearch::gpu
