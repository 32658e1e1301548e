// Host launchers of the scoring kernels (score.cu), as score_binding.cpp calls them. Plain C++ (raw
// pointers, sizes, a cudaStream_t) so that score.cu compiles without any torch header. Semantics:
// csrc/README.md, "Scoring ops".
//
// Every launcher enqueues one kernel on `stream` (those with a status also clear it first) and returns;
// the caller checks cudaGetLastError(). Arrays are contiguous (the hidden states: row by row); data arrays
// (hidden states, head rows, embeddings) share one DType, score arrays are a ScoreType; outputs are
// float32 and fully written.
// Offsets are device arrays whose values nobody checked: the kernels clamp every range into the arrays, so
// bad offsets or positions give wrong numbers (and a status entry where the kernel has one), never a
// stray access.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launchers.h"
#include "cuda/select_launchers.h"

namespace fastsearch::gpu {

// The op schemas' integer codes.
enum class Activation : int32_t { kSoftmax = 0, kSigmoid = 1 };
enum class Aggregation : int32_t { kLast = 0, kMin = 1, kProd = 2, kMean = 3, kMax = 4, kLogitSum = 5 };
enum class EnsembleMethod : int32_t { kRank = 0, kZScore = 1 };
// cosine_scores: one reference for every row, one per row, or one per group of rows (with offsets).
enum class ReferenceLayout : int32_t { kOne, kPairwise, kGrouped };

// Scores may be any data type or float64; the shared codes agree.
static_assert(static_cast<int32_t>(ScoreType::kFloat32) == static_cast<int32_t>(DType::kFloat32) &&
                  static_cast<int32_t>(ScoreType::kFloat16) == static_cast<int32_t>(DType::kFloat16) &&
                  static_cast<int32_t>(ScoreType::kBFloat16) == static_cast<int32_t>(DType::kBFloat16),
              "ScoreType extends DType");
constexpr ScoreType score_type(DType dtype) { return static_cast<ScoreType>(dtype); }

// What a kernel found in index and offset values that the host did not check (that would need a sync):
// int64 words that the launcher zeroes and the kernel fills; the binding reads them back with one sync.
enum StatusWord : int32_t {
  kLowestPosition,   // the lowest negative step position (atomic min from 0), or 0
  kPastEndPosition,  // 1 + the highest step position >= T (as uint64, atomic max from 0), or 0
  kFirstEmpty,       // ~n for the first candidate n without steps (as uint64, atomic max from 0), or 0
  kDecreasing,       // 1 when some step_offsets[n + 1] < step_offsets[n], else 0
  kFirstOffset,      // step_offsets[0]
  kLastOffset,       // step_offsets[N]
  kStatusWords
};

// Decoders of the status words: the finding, or -1 (kLowestPosition: 0) when there is none.
inline int64_t lowest_position(const int64_t* status) { return status[kLowestPosition]; }
inline int64_t past_end_position(const int64_t* status) {
  return static_cast<int64_t>(static_cast<uint64_t>(status[kPastEndPosition]) - 1);
}
inline int64_t first_empty_candidate(const int64_t* status) {
  return status[kFirstEmpty] == 0 ? -1 : ~status[kFirstEmpty];
}

// The PRM head: rows [rows, hidden_size] and bias [rows] (nullptr for none) of the hidden states' dtype.
struct PrmHead {
  const void* weight;
  const void* bias;
  int32_t rows;  // C, 1 ... 8
  int32_t positive_index;
  Activation activation;
};

// The packed hidden states [tokens, hidden_size] (row t at hidden_states + t * row_stride elements, each
// row contiguous) and the rows to score.
struct PrmInput {
  DType dtype;
  const void* hidden_states;
  int64_t tokens;
  int64_t hidden_size;
  int64_t row_stride;
  const int64_t* step_positions;  // [steps]
  int64_t steps;
};

// step_scores [steps]. status: kStatusWords words; only the position words are used.
void launch_prm_step_scores(const PrmInput& input, const PrmHead& head, float* step_scores, int64_t* status,
                            cudaStream_t stream);

// int64 words of scratch launch_prm_scores needs for `candidates`: the status words, then one counter per
// candidate.
int64_t prm_scores_workspace_words(int64_t candidates);

// candidate_scores [candidates] and step_scores [steps] in one kernel; step_offsets [candidates + 1].
// Candidates without steps get `empty` (NaN when !has_empty). The workspace is overwritten; its status
// words report bad positions, bad ends of step_offsets, decreasing offsets and, when !has_empty, the first
// candidate without steps.
void launch_prm_scores(const PrmInput& input, const PrmHead& head, const int64_t* step_offsets, int64_t candidates,
                       Aggregation how, bool has_empty, float empty, float* candidate_scores, float* step_scores,
                       int64_t* workspace, cudaStream_t stream);

// out [candidates]: ragged step_scores [total_steps] split by step_offsets [candidates + 1], or dense
// [candidates, steps_per_candidate] when step_offsets is nullptr. status may be nullptr; otherwise (ragged
// only) its offset words report bad ends, decreasing offsets and, when !has_empty, the first candidate
// without steps.
void launch_aggregate_steps(ScoreType dtype, const void* step_scores, const int64_t* step_offsets, int64_t candidates,
                            int64_t steps_per_candidate, int64_t total_steps, Aggregation how, bool has_empty,
                            float empty, float* out, int64_t* status, cudaStream_t stream);

// out [rows]: cosine of embeddings [rows, dim] with references [dim] (kOne), [rows, dim] (kPairwise) or
// [groups, dim] (kGrouped; offsets [groups + 1] over the rows).
void launch_cosine_scores(DType dtype, const void* embeddings, int64_t rows, int64_t dim, const void* references,
                          ReferenceLayout layout, const int64_t* offsets, int64_t groups, float* out,
                          cudaStream_t stream);

// out [candidates] from scores [verifiers, candidates] over groups (offsets [groups + 1], or nullptr for
// one group of all candidates); weights [verifiers] float32 or nullptr for all 1. groups < 2^31.
void launch_ensemble_scores(ScoreType dtype, const void* scores, int64_t verifiers, int64_t candidates,
                            const int64_t* offsets, int64_t groups, EnsembleMethod method, const float* weights,
                            float* out, cudaStream_t stream);

}  // namespace fastsearch::gpu
