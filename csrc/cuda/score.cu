// CUDA kernels of the scoring ops: PRM step scores (alone, and fused with their aggregation), step
// aggregation, cosine scores and verifier ensembles. Semantics: csrc/README.md ("Scoring ops"); oracle:
// fastsearch/ops/score.py. All arithmetic is fp32.
//
// Rows (prm_step_scores, prm_scores, cosine_scores). A row's work is a few dot products over H (or D)
// elements, read in 16-byte packs when the pointers and the row length allow it (else element by
// element); each hidden row is read once for all C head rows. A team of 1, 2, 4 or 8 warps of a block
// scores one row at a time: one warp per row while there are enough rows to fill the GPU, more warps
// per row (down to kMinUnitsPerLane packs a thread) when there are few. The grid is one wave of blocks;
// each team takes a contiguous share of the rows and walks it, so a team meets each row's owner
// (candidate or group) in order: one binary search in the offsets per team, then a forward walk.
//
// prm_scores in one launch. A candidate's steps may be spread over several teams and blocks (few long
// candidates keep the whole GPU busy, many short ones cost one warp-step each). Each team writes its step
// scores, then counts them in the candidate's counter (an atomic add after a fence); the team that
// brings the count to the candidate's size aggregates the candidate's step scores with one warp, reading
// them past the L1 (which may hold stale lines written by other SMs). Candidates without steps are
// settled by the grid's threads, one thread per candidate, before the rows. The same pass checks the
// step offsets, which the host cannot read without a sync: what it finds goes to the status words the
// binding reads back (see score_launchers.h), together with out-of-range step positions, which are
// skipped (their score is NaN).
//
// aggregate_steps: one warp per candidate. ensemble_scores: one block per group, verifier by verifier;
// ranks count, for each member, the members below and equal to it over a shared-memory copy of the group's
// order keys (O(size^2), tiled through shared memory for groups above kRankTile); z-scores take a
// block-wide mean, then a block-wide sum of squared deviations. Each thread owns the same members of its
// group for every verifier, so it accumulates their weighted sum in the output without any barrier.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cuda/device_common.cuh"
#include "cuda/score_launchers.h"

namespace fastsearch::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned int kFullMask = 0xFFFFFFFFu;
// Row kernels stay within 80 registers a thread (bf16 packs in flight need them), so that three blocks
// (24 warps, each with up to 4 packs of 16 bytes a thread in flight) share an SM.
constexpr int kBlocksPerSm = 3;
// The head rows a PRM kernel keeps logits for (the op allows 1 to 8).
constexpr int kMaxRows = 8;
// A row is split over more warps only while each thread keeps at least this many packs.
constexpr int kMinUnitsPerLane = 4;
// Ensemble ranks: order keys of this many group members sit in shared memory at once (16 KiB).
constexpr int kRankTile = 4096;
// Grids larger than this loop (gridDim.x allows 2^31 - 1).
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

constexpr float kLogitClip = 1e-7f;
constexpr float kLogitClipHigh = 1.0f - kLogitClip;  // 1 - 1e-7 rounded to fp32, as torch.clamp uses it
constexpr float kNormEps = 1e-12f;

// -- values and reductions -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float as_fp32(T value) {
  return to_float(value);
}
__device__ __forceinline__ float as_fp32(double value) { return static_cast<float>(value); }

// min / max that let a NaN through, like torch.amin / torch.amax.
__device__ __forceinline__ float min_keeping_nan(float a, float b) { return isnan(a) || a < b ? a : b; }
__device__ __forceinline__ float max_keeping_nan(float a, float b) { return isnan(a) || a > b ? a : b; }

// Butterfly sum over the warp: every lane gets the same total.
template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sum over the block, in every thread, adding the warps' sums in a fixed order. Ends with a barrier, so
// `slots` may be reused right away.
template <typename V>
__device__ V block_sum(V value, V (&slots)[kWarps]) {
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) slots[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  V total = 0;
#pragma unroll
  for (int warp = 0; warp < kWarps; ++warp) total += slots[warp];
  __syncthreads();
  return total;
}

// -- ragged segments -----------------------------------------------------------------------------------

struct Range {
  int64_t begin;
  int64_t end;

  __device__ int64_t size() const { return end - begin; }
};

// Candidates (or groups) over `total` items: segment n owns items [offsets[n], offsets[n + 1]). The offsets
// are unchecked device values; every range is clamped into [0, total).
struct Segments {
  const int64_t* offsets;  // [count + 1]
  int64_t count;
  int64_t total;

  __device__ Range range(int64_t n) const {
    const int64_t begin = min(max(offsets[n], int64_t{0}), total);
    return Range{begin, min(max(offsets[n + 1], begin), total)};
  }

  // The last segment n with offsets[n] <= item (0 when none): the owner of `item` for valid offsets,
  // which is never a segment without items. count >= 1.
  __device__ int64_t owner(int64_t item) const {
    int64_t low = 0;
    int64_t high = count - 1;
    while (low < high) {
      const int64_t mid = high - (high - low) / 2;
      if (offsets[mid] <= item) {
        low = mid;
      } else {
        high = mid - 1;
      }
    }
    return low;
  }

  // The owner of `item` given the owner n of an earlier item.
  __device__ int64_t next_owner(int64_t n, int64_t item) const {
    while (n + 1 < count && offsets[n + 1] <= item) ++n;
    return n;
  }
};

// -- status words (see score_launchers.h) ------------------------------------------------------------

__device__ void report_position(unsigned long long* status, int64_t position) {
  if (position < 0) {
    atomicMin(reinterpret_cast<long long*>(status + kLowestPosition), static_cast<long long>(position));
  } else {
    atomicMax(status + kPastEndPosition, static_cast<unsigned long long>(position) + 1);
  }
}

__device__ void record_offset_ends(const Segments& candidates, unsigned long long* status) {
  status[kFirstOffset] = static_cast<unsigned long long>(candidates.offsets[0]);
  status[kLastOffset] = static_cast<unsigned long long>(candidates.offsets[candidates.count]);
}

// Reports decreasing offsets at candidate n, and n itself if it has no steps while `empty` is absent.
__device__ void check_candidate(const Segments& candidates, int64_t n, bool report_empty,
                                unsigned long long* status) {
  const int64_t begin = candidates.offsets[n];
  const int64_t end = candidates.offsets[n + 1];
  if (end < begin) atomicMax(status + kDecreasing, 1ull);
  if (end == begin && report_empty) atomicMax(status + kFirstEmpty, ~static_cast<unsigned long long>(n));
}

// -- step aggregation ----------------------------------------------------------------------------------

__device__ __forceinline__ float aggregation_start(Aggregation how) {
  switch (how) {
    case Aggregation::kMin:
      return INFINITY;
    case Aggregation::kMax:
      return -INFINITY;
    case Aggregation::kProd:
      return 1.0f;
    default:  // kMean, kLogitSum: sums
      return 0.0f;
  }
}

// What a step contributes: its score, or for logit_sum log(q / (1 - q)) of the clipped score (a NaN
// stays NaN through the clip, as in torch.clamp).
__device__ __forceinline__ float aggregation_term(Aggregation how, float score) {
  if (how != Aggregation::kLogitSum) return score;
  const float clipped = score < kLogitClip ? kLogitClip : (score > kLogitClipHigh ? kLogitClipHigh : score);
  return logf(clipped) - log1pf(-clipped);
}

__device__ __forceinline__ float aggregation_combine(Aggregation how, float a, float b) {
  switch (how) {
    case Aggregation::kMin:
      return min_keeping_nan(a, b);
    case Aggregation::kMax:
      return max_keeping_nan(a, b);
    case Aggregation::kProd:
      return a * b;
    default:
      return a + b;
  }
}

// One candidate's score from its `size` step scores read(0) ... read(size - 1), by one warp (converged);
// every lane gets it.
template <typename Read>
__device__ __forceinline__ float warp_aggregate(const Read& read, int64_t size, Aggregation how, float empty) {
  if (size == 0) return empty;
  if (how == Aggregation::kLast) return read(size - 1);
  float value = aggregation_start(how);
  for (int64_t i = threadIdx.x % kWarpSize; i < size; i += kWarpSize) {
    value = aggregation_combine(how, value, aggregation_term(how, read(i)));
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = aggregation_combine(how, value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return how == Aggregation::kMean ? value / static_cast<float>(size) : value;
}

template <typename T>
struct AggregateProblem {
  const T* scores;
  Segments candidates;  // offsets nullptr: dense rows of steps_per_candidate
  int64_t steps_per_candidate;
  Aggregation how;
  float empty;  // NaN when the op's `empty` is absent
  bool report_empty;
  float* out;
  unsigned long long* status;  // nullptr: no checks
};

template <typename T>
__global__ void __launch_bounds__(kThreads) aggregate_steps_kernel(AggregateProblem<T> p) {
  const bool ragged = p.candidates.offsets != nullptr;
  const bool checked = ragged && p.status != nullptr;
  if (checked && blockIdx.x == 0 && threadIdx.x == 0) record_offset_ends(p.candidates, p.status);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; n < p.candidates.count;
       n += warps) {
    const Range steps = ragged ? p.candidates.range(n)
                               : Range{n * p.steps_per_candidate, (n + 1) * p.steps_per_candidate};
    const T* values = p.scores + steps.begin;
    const float score =
        warp_aggregate([values](int64_t i) { return as_fp32(values[i]); }, steps.size(), p.how, p.empty);
    if (threadIdx.x % kWarpSize == 0) {
      p.out[n] = score;
      if (checked) check_candidate(p.candidates, n, p.report_empty, p.status);
    }
  }
}

// -- teams of warps over rows ------------------------------------------------------------------------

// `warps` consecutive warps of a block (1, 2, 4 or 8) that score one row at a time.
struct Team {
  int warps;
  int warp;        // this warp's place in the team
  int first_warp;  // the team's first warp in the block
  int lane;        // this thread's place in the team
  int64_t index;   // the team's place in the grid
  int64_t count;   // teams in the grid

  __device__ int threads() const { return warps * kWarpSize; }
};

__device__ __forceinline__ Team make_team(int warps) {
  const int block_warp = static_cast<int>(threadIdx.x) / kWarpSize;
  Team team;
  team.warps = warps;
  team.warp = block_warp % warps;
  team.first_warp = block_warp - team.warp;
  team.lane = team.warp * kWarpSize + static_cast<int>(threadIdx.x) % kWarpSize;
  const int per_block = kWarps / warps;
  team.index = static_cast<int64_t>(blockIdx.x) * per_block + block_warp / warps;
  team.count = static_cast<int64_t>(gridDim.x) * per_block;
  return team;
}

// A team's share of `items`: a contiguous run, the first items % count teams taking one more. `rounds` is
// the longest share, the same for every team, so that teams of a block meet at its barriers in step.
struct TeamItems {
  int64_t begin;
  int64_t end;
  int64_t rounds;
};

__device__ __forceinline__ TeamItems team_items(const Team& team, int64_t items) {
  const int64_t share = items / team.count;
  const int64_t extra = items % team.count;
  const int64_t begin = team.index * share + min(team.index, extra);
  return TeamItems{begin, begin + share + (team.index < extra ? 1 : 0), share + (extra > 0 ? 1 : 0)};
}

// Per-warp partial sums of the teams of a block, double-buffered by round.
template <int kSums>
struct TeamPartials {
  float sums[2][kWarps][kSums];
};

// Sums each of kSums values over the team; every thread of the team gets the totals (the warps' sums are
// added in a fixed order). A team of several warps meets at a block barrier, so every thread of the block
// calls this once per round; a warp overwrites its round's buffer only after the next round's barrier,
// which every reader of the buffer has reached.
template <int kSums>
__device__ __forceinline__ void team_sum(float (&sums)[kSums], const Team& team, TeamPartials<kSums>& partials,
                                         int64_t round) {
#pragma unroll
  for (int k = 0; k < kSums; ++k) sums[k] = warp_sum(sums[k]);
  if (team.warps == 1) return;
  float(&buffer)[kWarps][kSums] = partials.sums[round & 1];
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) buffer[team.first_warp + team.warp][k] = sums[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    float total = 0.0f;
    for (int warp = 0; warp < team.warps; ++warp) total += buffer[team.first_warp + warp][k];
    sums[k] = total;
  }
}

// Calls use(unit, pack) for the packs of a row that this thread of the team owns (team.lane,
// team.lane + team.threads(), ...), loading kAhead packs before using them so that their loads overlap.
template <int kAhead, typename Unit, typename Use>
__device__ __forceinline__ void for_each_unit(const Unit* __restrict__ row, int64_t units, const Team& team,
                                              const Use& use) {
  const int64_t stride = team.threads();
  for (int64_t base = team.lane; base < units; base += stride * kAhead) {
    Unit packs[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (base + k * stride < units) packs[k] = row[base + k * stride];
    }
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (base + k * stride < units) use(base + k * stride, packs[k]);
    }
  }
}

// Packs in flight per thread: fewer with many accumulators, to stay within the register budget.
template <int kVec, int kSums>
constexpr int kAheadFor = kVec == 1 ? 8 : (kSums <= 4 ? 4 : 2);

// Warps per row and blocks of a row kernel (see the file comment).
struct TeamShape {
  int warps;
  unsigned int blocks;
};

int64_t ceil_div(int64_t work, int64_t per_block) { return (work + per_block - 1) / per_block; }

// SM counts of the devices seen so far (0: not read yet), so that a launch asks the driver once per device.
// Launchers run on any host thread: each entry is an atomic, and two threads that race to fill one store the
// same value.
constexpr int kCachedDevices = 64;
std::atomic<int> sm_counts[kCachedDevices];

// SMs of the current device (the binding's CUDAGuard made the tensors' device current). cudaGetDevice reads
// the runtime's per-thread current device (no driver call). A failed query leaves its error as the thread's
// last error, which the binding's launch check raises, and sizes the grid for one SM meanwhile.
int multiprocessors() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached) {
    const int known = sm_counts[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) return 1;
  if (cached) sm_counts[device].store(count, std::memory_order_relaxed);
  return count;
}

// `rows` rows of `units` packs; `threads_wanted` (prm_scores: one per candidate) asks for enough blocks to
// give each a thread in one pass.
TeamShape team_shape(int64_t rows, int64_t units, int64_t threads_wanted) {
  const int64_t wave = static_cast<int64_t>(multiprocessors()) * kBlocksPerSm;
  int warps = 1;
  while (warps < kWarps && rows * warps < wave * kWarps &&
         units >= int64_t{2} * warps * kWarpSize * kMinUnitsPerLane) {
    warps *= 2;
  }
  const int64_t blocks = std::max(ceil_div(rows, kWarps / warps), ceil_div(threads_wanted, kThreads));
  return TeamShape{warps, static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, wave))};
}

// -- PRM step scores (and prm_scores) ----------------------------------------------------------------

template <typename T>
struct PrmProblem {
  const T* hidden;  // [tokens, hidden_size], rows row_stride apart
  int64_t tokens;
  int64_t hidden_size;
  int64_t row_stride;
  const int64_t* positions;  // [steps]
  int64_t steps;
  // The head rows in slot order: slot 0 holds the positive row, then the others follow cyclically. With
  // the positive logit in slot 0 the logits need no dynamic index (which would put them in local memory);
  // kernel parameters cost no registers.
  const T* head_weight[kMaxRows];  // [hidden_size] each
  const T* head_bias[kMaxRows];    // one value each, or nullptr
  int rows;
  Activation activation;
  float* step_scores;
  unsigned long long* status;
  // prm_scores only; candidates.offsets is nullptr for prm_step_scores.
  Segments candidates;
  Aggregation how;
  float empty;  // NaN when the op's `empty` is absent
  bool report_empty;
  float* candidate_scores;
  unsigned long long* counters;  // [candidates], zeroed: step scores written so far
};

// The logits l_c = h . W_c of one hidden row, in this thread's part (summed over the team afterwards).
template <int kVec, int kRows, typename T>
__device__ __forceinline__ void accumulate_logits(const PrmProblem<T>& p, const T* row, const Team& team,
                                                  float (&logits)[kRows]) {
  using Unit = Pack<T, kVec>;
  const auto use = [&](int64_t unit, const Unit& pack) {
    float hidden[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) hidden[j] = to_float(pack.values[j]);
#pragma unroll
    for (int c = 0; c < kRows; ++c) {
      if (c < p.rows) {
        const Unit head = reinterpret_cast<const Unit*>(p.head_weight[c])[unit];
#pragma unroll
        for (int j = 0; j < kVec; ++j) logits[c] = fmaf(hidden[j], to_float(head.values[j]), logits[c]);
      }
    }
  };
  for_each_unit<kAheadFor<kVec, kRows>>(reinterpret_cast<const Unit*>(row), p.hidden_size / kVec, team, use);
}

// softmax(l + b)[positive] or sigmoid(l_positive + b_positive) from the slot-ordered logits, as torch
// computes them: max-shifted exponentials (a NaN or +inf logit gives NaN), 1 / (1 + exp(-l)).
template <int kRows, typename T>
__device__ __forceinline__ float head_score(const PrmProblem<T>& p, float (&logits)[kRows]) {
  float top = -INFINITY;
#pragma unroll
  for (int c = 0; c < kRows; ++c) {
    if (c < p.rows) {
      if (p.head_bias[c] != nullptr) logits[c] += to_float(*p.head_bias[c]);
      top = max_keeping_nan(top, logits[c]);
    }
  }
  if (p.activation == Activation::kSigmoid) return 1.0f / (1.0f + expf(-logits[0]));
  float total = 0.0f;
#pragma unroll
  for (int c = 0; c < kRows; ++c) {
    if (c < p.rows) total += expf(logits[c] - top);
  }
  return expf(logits[0] - top) / total;
}

// prm_scores: candidates without steps get `empty`; the offsets are checked on the way.
template <typename T>
__device__ __forceinline__ void settle_empty_candidates(const PrmProblem<T>& p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) record_offset_ends(p.candidates, p.status);
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; n < p.candidates.count;
       n += threads) {
    check_candidate(p.candidates, n, p.report_empty, p.status);
    if (p.candidates.range(n).size() == 0) p.candidate_scores[n] = p.empty;
  }
}

// prm_scores, by the warp that wrote a step score of `candidate` (lane 0 wrote it): counts the step, and if
// it was the candidate's last, aggregates the candidate.
template <typename T>
__device__ __forceinline__ void count_step(const PrmProblem<T>& p, int64_t candidate) {
  const Range steps = p.candidates.range(candidate);
  int last = 0;
  if (threadIdx.x % kWarpSize == 0) {
    __threadfence();  // release: the step score is visible device-wide before it is counted
    const unsigned long long counted = atomicAdd(p.counters + candidate, 1ull) + 1;
    last = counted == static_cast<unsigned long long>(steps.size());
    // Acquire, on the lane that saw the final count and before it tells the others: the step scores that the
    // other teams released before their counts are visible from here on.
    if (last) __threadfence();
  }
  last = __shfl_sync(kFullMask, last, 0);
  if (!last) return;
  __syncwarp();  // orders lane 0's acquire before the other lanes' reads below
  const float* scores = p.step_scores + steps.begin;
  const float score = warp_aggregate([scores](int64_t i) { return __ldcg(scores + i); }, steps.size(), p.how, p.empty);
  if (threadIdx.x % kWarpSize == 0) p.candidate_scores[candidate] = score;
}

template <typename T, int kVec, int kRows>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) prm_kernel(PrmProblem<T> p, int team_warps) {
  __shared__ TeamPartials<kRows> partials;
  const bool fused = p.candidates.offsets != nullptr;
  if (fused) settle_empty_candidates(p);
  const bool aggregate = fused && p.candidates.count > 0;
  const Team team = make_team(team_warps);
  const TeamItems items = team_items(team, p.steps);
  int64_t candidate = aggregate && items.begin < items.end ? p.candidates.owner(items.begin) : 0;
  for (int64_t round = 0; round < items.rounds; ++round) {
    const int64_t step = items.begin + round;
    const bool active = step < items.end;
    bool in_range = false;
    float logits[kRows];
#pragma unroll
    for (int c = 0; c < kRows; ++c) logits[c] = 0.0f;
    if (active) {
      const int64_t position = p.positions[step];
      in_range = position >= 0 && position < p.tokens;
      if (in_range) {
        accumulate_logits<kVec>(p, p.hidden + position * p.row_stride, team, logits);
      } else if (team.lane == 0) {
        report_position(p.status, position);
      }
    }
    team_sum(logits, team, partials, round);
    if (!active || team.warp != 0) continue;
    const float score = in_range ? head_score(p, logits) : NAN;
    if (team.lane == 0) p.step_scores[step] = score;
    if (aggregate) {
      candidate = p.candidates.next_owner(candidate, step);
      count_step(p, candidate);
    }
  }
}

template <typename T, int kVec>
void run_prm(const PrmProblem<T>& p, TeamShape shape, cudaStream_t stream) {
  if (p.rows <= 2) {
    prm_kernel<T, kVec, 2><<<shape.blocks, kThreads, 0, stream>>>(p, shape.warps);
  } else if (p.rows <= 4) {
    prm_kernel<T, kVec, 4><<<shape.blocks, kThreads, 0, stream>>>(p, shape.warps);
  } else {
    prm_kernel<T, kVec, kMaxRows><<<shape.blocks, kThreads, 0, stream>>>(p, shape.warps);
  }
}

// Packed loads need every row of the hidden states and of the head to start on a 16-byte boundary (the
// head's slot rows do when the first does: H is a multiple of the pack).
template <typename T>
void run_prm(const PrmProblem<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  using Unit = Pack<T, kVec>;
  const bool packed = p.hidden_size % kVec == 0 && p.row_stride % kVec == 0 && is_aligned_for<Unit>(p.hidden) &&
                      is_aligned_for<Unit>(p.head_weight[0]);
  const int64_t units = packed ? p.hidden_size / kVec : p.hidden_size;
  const TeamShape shape = team_shape(p.steps, units, p.candidates.count);
  if (packed) {
    run_prm<T, kVec>(p, shape, stream);
  } else {
    run_prm<T, 1>(p, shape, stream);
  }
}

template <typename T>
PrmProblem<T> prm_problem(const PrmInput& input, const PrmHead& head, float* step_scores, int64_t* status) {
  PrmProblem<T> p{};
  p.hidden = static_cast<const T*>(input.hidden_states);
  p.tokens = input.tokens;
  p.hidden_size = input.hidden_size;
  p.row_stride = input.row_stride;
  p.positions = input.step_positions;
  p.steps = input.steps;
  for (int slot = 0; slot < head.rows; ++slot) {
    const int64_t row = (head.positive_index + slot) % head.rows;
    p.head_weight[slot] = static_cast<const T*>(head.weight) + row * input.hidden_size;
    p.head_bias[slot] = head.bias == nullptr ? nullptr : static_cast<const T*>(head.bias) + row;
  }
  p.rows = head.rows;
  p.activation = head.activation;
  p.step_scores = step_scores;
  p.status = reinterpret_cast<unsigned long long*>(status);
  p.candidates = Segments{nullptr, 0, input.steps};
  return p;
}

// -- cosine scores -------------------------------------------------------------------------------------

template <typename T>
struct CosineProblem {
  const T* embeddings;  // [rows, dim]
  const T* references;  // [dim], [rows, dim] or [groups, dim]
  int64_t rows;
  int64_t dim;
  ReferenceLayout layout;
  Segments groups;  // kGrouped
  float* out;
};

// Sums e.r, e.e and r.r of one row, in this thread's part.
template <int kVec, typename T>
__device__ __forceinline__ void accumulate_cosine(const CosineProblem<T>& p, const T* row, const T* reference,
                                                  const Team& team, float (&sums)[3]) {
  using Unit = Pack<T, kVec>;
  const Unit* reference_units = reinterpret_cast<const Unit*>(reference);
  const auto use = [&](int64_t unit, const Unit& pack) {
    const Unit other = reference_units[unit];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float e = to_float(pack.values[j]);
      const float r = to_float(other.values[j]);
      sums[0] = fmaf(e, r, sums[0]);
      sums[1] = fmaf(e, e, sums[1]);
      sums[2] = fmaf(r, r, sums[2]);
    }
  };
  for_each_unit<kAheadFor<kVec, 3>>(reinterpret_cast<const Unit*>(row), p.dim / kVec, team, use);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) cosine_kernel(CosineProblem<T> p, int team_warps) {
  __shared__ TeamPartials<3> partials;
  const bool grouped = p.layout == ReferenceLayout::kGrouped;
  const Team team = make_team(team_warps);
  const TeamItems items = team_items(team, p.rows);
  // Offsets without groups leave the rows without references.
  const bool referenced = !grouped || p.groups.count > 0;
  int64_t group = grouped && referenced && items.begin < items.end ? p.groups.owner(items.begin) : 0;
  for (int64_t round = 0; round < items.rounds; ++round) {
    const int64_t row = items.begin + round;
    const bool active = row < items.end;
    float sums[3] = {0.0f, 0.0f, 0.0f};
    if (active && referenced) {
      int64_t reference_row = p.layout == ReferenceLayout::kPairwise ? row : 0;
      if (grouped) {
        group = p.groups.next_owner(group, row);
        reference_row = group;
      }
      accumulate_cosine<kVec>(p, p.embeddings + row * p.dim, p.references + reference_row * p.dim, team, sums);
    }
    team_sum(sums, team, partials, round);
    if (active && team.lane == 0) {
      const float norms = clamp_min(sqrtf(sums[1]), kNormEps) * clamp_min(sqrtf(sums[2]), kNormEps);
      p.out[row] = referenced ? sums[0] / norms : NAN;
    }
  }
}

template <typename T>
void run_cosine(const CosineProblem<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  using Unit = Pack<T, kVec>;
  const bool packed = p.dim % kVec == 0 && is_aligned_for<Unit>(p.embeddings) && is_aligned_for<Unit>(p.references);
  const TeamShape shape = team_shape(p.rows, packed ? p.dim / kVec : p.dim, 0);
  if (packed) {
    cosine_kernel<T, kVec><<<shape.blocks, kThreads, 0, stream>>>(p, shape.warps);
  } else {
    cosine_kernel<T, 1><<<shape.blocks, kThreads, 0, stream>>>(p, shape.warps);
  }
}

// -- ensemble scores -----------------------------------------------------------------------------------

// An integer whose order is the rank order of the values: NaN below every number and equal to NaN, -0.0
// equal to +0.0.
__device__ __forceinline__ uint32_t rank_key(float value) {
  if (isnan(value)) return 0u;
  const uint32_t bits = __float_as_uint(value == 0.0f ? 0.0f : value);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

template <typename T>
struct EnsembleProblem {
  const T* scores;  // [verifiers, candidates]
  int64_t verifiers;
  int64_t candidates;
  Segments groups;  // offsets nullptr: one group of all candidates
  EnsembleMethod method;
  const float* weights;  // [verifiers] or nullptr
  float* out;
};

struct EnsembleStorage {
  uint32_t keys[kRankTile];
  double sum_slots[kWarps];
  int64_t count_slots[kWarps];
};

// keys[j] = rank_key(x[j]) for j < count, between barriers (the previous keys may still be being read).
template <typename T>
__device__ void load_rank_keys(const T* x, int64_t count, uint32_t* keys) {
  __syncthreads();
  for (int64_t j = threadIdx.x; j < count; j += kThreads) keys[j] = rank_key(as_fp32(x[j]));
  __syncthreads();
}

// out[i] += weight * rank of x[i] in x[0, size): 1 + #below + (#equal - 1) / 2, the member itself included.
template <typename T>
__device__ void add_ranks(const T* x, int64_t size, float weight, float* out, EnsembleStorage& s) {
  const bool resident = size <= kRankTile;
  if (resident) load_rank_keys(x, size, s.keys);
  for (int64_t first = 0; first < size; first += kThreads) {
    const int64_t i = first + threadIdx.x;
    const uint32_t own = i < size ? rank_key(as_fp32(x[i])) : 0u;
    int64_t below = 0;
    int64_t equal = 0;
    for (int64_t tile = 0; tile < size; tile += kRankTile) {
      const int count = static_cast<int>(min(static_cast<int64_t>(kRankTile), size - tile));
      if (!resident) load_rank_keys(x + tile, count, s.keys);
      if (i < size) {
        int tile_below = 0;
        int tile_equal = 0;
        for (int j = 0; j < count; ++j) {
          tile_below += s.keys[j] < own;
          tile_equal += s.keys[j] == own;
        }
        below += tile_below;
        equal += tile_equal;
      }
    }
    if (i < size) out[i] += weight * (1.0f + static_cast<float>(below) + static_cast<float>(equal - 1) * 0.5f);
  }
}

// out[i] += weight * z-score of x[i] over the finite members (population std; 0 where it is 0); +inf for
// +inf, -inf for -inf and NaN. Sums, mean, std and z in fp64, z rounded once to fp32, as the reference does:
// an fp32 mean of close scores would round onto one of them.
template <typename T>
__device__ void add_zscores(const T* x, int64_t size, float weight, float* out, EnsembleStorage& s) {
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t i = threadIdx.x; i < size; i += kThreads) {
    const float value = as_fp32(x[i]);
    if (isfinite(value)) {
      sum += value;
      ++count;
    }
  }
  sum = block_sum(sum, s.sum_slots);
  count = block_sum(count, s.count_slots);
  const double divisor = static_cast<double>(max(count, int64_t{1}));
  const double mean = sum / divisor;
  double squares = 0.0;
  for (int64_t i = threadIdx.x; i < size; i += kThreads) {
    const float value = as_fp32(x[i]);
    if (isfinite(value)) {
      const double deviation = static_cast<double>(value) - mean;
      squares += deviation * deviation;
    }
  }
  const double deviation = sqrt(block_sum(squares, s.sum_slots) / divisor);
  for (int64_t i = threadIdx.x; i < size; i += kThreads) {
    const float value = as_fp32(x[i]);
    float z;
    if (value == INFINITY) {
      z = INFINITY;
    } else if (isnan(value) || value == -INFINITY) {
      z = -INFINITY;
    } else {
      z = deviation > 0.0 ? static_cast<float>((static_cast<double>(value) - mean) / deviation) : 0.0f;
    }
    out[i] += weight * z;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ensemble_kernel(EnsembleProblem<T> p) {
  __shared__ EnsembleStorage storage;
  const Range group = p.groups.offsets != nullptr ? p.groups.range(blockIdx.x) : Range{0, p.candidates};
  const int64_t size = group.size();
  if (size == 0) return;
  float* out = p.out + group.begin;
  for (int64_t i = threadIdx.x; i < size; i += kThreads) out[i] = 0.0f;
  // Verifiers with weight 0 are left out; the rest are added in order, as the reference sums them.
  float weight_total = 0.0f;
  for (int64_t v = 0; v < p.verifiers; ++v) {
    const float weight = p.weights != nullptr ? p.weights[v] : 1.0f;
    if (weight == 0.0f) continue;
    weight_total += weight;
    const T* x = p.scores + v * p.candidates + group.begin;
    if (p.method == EnsembleMethod::kRank) {
      add_ranks(x, size, weight, out, storage);
    } else {
      add_zscores(x, size, weight, out, storage);
    }
  }
  for (int64_t i = threadIdx.x; i < size; i += kThreads) out[i] /= weight_total;
}

// Calls body(TypeTag<T>{}) with the storage type T of a score type.
template <typename Body>
void dispatch_score_type(ScoreType type, Body&& body) {
  if (type == ScoreType::kFloat64) {
    body(TypeTag<double>{});
  } else {
    dispatch_dtype(static_cast<DType>(type), body);
  }
}

}  // namespace

void launch_prm_step_scores(const PrmInput& input, const PrmHead& head, float* step_scores, int64_t* status,
                            cudaStream_t stream) {
  FASTSEARCH_CUDA_OR_RETURN(cudaMemsetAsync(status, 0, kStatusWords * sizeof(int64_t), stream));
  if (input.steps == 0) return;
  dispatch_dtype(input.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_prm(prm_problem<T>(input, head, step_scores, status), stream);
  });
}

int64_t prm_scores_workspace_words(int64_t candidates) { return kStatusWords + candidates; }

void launch_prm_scores(const PrmInput& input, const PrmHead& head, const int64_t* step_offsets, int64_t candidates,
                       Aggregation how, bool has_empty, float empty, float* candidate_scores, float* step_scores,
                       int64_t* workspace, cudaStream_t stream) {
  FASTSEARCH_CUDA_OR_RETURN(
      cudaMemsetAsync(workspace, 0, prm_scores_workspace_words(candidates) * sizeof(int64_t), stream));
  dispatch_dtype(input.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    PrmProblem<T> p = prm_problem<T>(input, head, step_scores, workspace);
    p.candidates = Segments{step_offsets, candidates, input.steps};
    p.how = how;
    p.empty = has_empty ? empty : std::numeric_limits<float>::quiet_NaN();
    p.report_empty = !has_empty;
    p.candidate_scores = candidate_scores;
    p.counters = reinterpret_cast<unsigned long long*>(workspace + kStatusWords);
    run_prm(p, stream);
  });
}

void launch_aggregate_steps(ScoreType dtype, const void* step_scores, const int64_t* step_offsets, int64_t candidates,
                            int64_t steps_per_candidate, int64_t total_steps, Aggregation how, bool has_empty,
                            float empty, float* out, int64_t* status, cudaStream_t stream) {
  if (status != nullptr) {
    FASTSEARCH_CUDA_OR_RETURN(cudaMemsetAsync(status, 0, kStatusWords * sizeof(int64_t), stream));
  }
  // Ragged offsets always have a first and a last value to record, even without candidates.
  const bool any = candidates > 0 || (status != nullptr && step_offsets != nullptr);
  if (!any) return;
  const auto blocks = static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(candidates, kWarps), 1, kMaxBlocks));
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const AggregateProblem<T> p{static_cast<const T*>(step_scores),
                                Segments{step_offsets, candidates, total_steps},
                                steps_per_candidate,
                                how,
                                has_empty ? empty : std::numeric_limits<float>::quiet_NaN(),
                                !has_empty,
                                out,
                                reinterpret_cast<unsigned long long*>(status)};
    aggregate_steps_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
  });
}

void launch_cosine_scores(DType dtype, const void* embeddings, int64_t rows, int64_t dim, const void* references,
                          ReferenceLayout layout, const int64_t* offsets, int64_t groups, float* out,
                          cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const CosineProblem<T> p{static_cast<const T*>(embeddings), static_cast<const T*>(references), rows, dim,
                             layout, Segments{offsets, groups, rows}, out};
    run_cosine(p, stream);
  });
}

void launch_ensemble_scores(ScoreType dtype, const void* scores, int64_t verifiers, int64_t candidates,
                            const int64_t* offsets, int64_t groups, EnsembleMethod method, const float* weights,
                            float* out, cudaStream_t stream) {
  if (candidates == 0) return;
  const unsigned int blocks = offsets != nullptr ? static_cast<unsigned int>(groups) : 1u;
  if (blocks == 0) return;
  dispatch_score_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const EnsembleProblem<T> p{static_cast<const T*>(scores), verifiers, candidates,
                               Segments{offsets, groups, candidates}, method, weights, out};
    ensemble_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
  });
}

}  // namespace fastsearch::gpu
