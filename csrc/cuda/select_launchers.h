// Host launchers of the selection kernels (select.cu), as select_binding.cpp calls them. Plain C++ (raw
// pointers, sizes, a cudaStream_t) so that select.cu compiles without any torch header. Semantics:
// csrc/README.md, "Selection ops".
//
// Every launcher enqueues one kernel on `stream` and returns (resample also clears its status words
// first); the caller checks cudaGetLastError(). Arrays are contiguous; outputs are fully written, padding
// included. Groups hold fewer than 2^31 candidates and there are fewer than 2^31 groups.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsearch::gpu {

// Storage type of scores and log-weights. Compared in fp32 (float64: in fp64) unless an op says otherwise.
enum class ScoreType : int32_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Storage type of beam_prune's lengths; converted to fp32 as lengths.float() does.
enum class LengthType : int32_t { kInt64, kInt32, kInt16, kInt8, kUInt8, kFloat32, kFloat64 };

// The op schemas' integer codes.
enum class ResampleMethod : int32_t { kMultinomial = 0, kSystematic = 1, kStratified = 2, kResidual = 3 };
enum class VoteMode : int32_t { kMajority = 0, kWeighted = 1, kMax = 2 };

// Where the groups of a flat [total] array start and end. Dense [groups, group_size] input has no
// offsets; ragged input has device offsets [groups + 1] (values unchecked: each group is clamped to
// [0, total)). Dense groups report row-local indices, ragged ones flat indices (resample: always flat).
struct GroupLayout {
  const int64_t* offsets;  // nullptr for dense groups
  int64_t groups;
  int64_t group_size;  // dense only
  int64_t total;
};

// values [groups, k] (scores' type) and indices [groups, k]: the k best selectable entries of each group,
// best first; -1 / -inf (+inf when !largest) pad. mask may be nullptr.
void launch_segmented_topk(ScoreType dtype, const void* scores, const bool* mask, GroupLayout layout, int64_t k,
                           bool largest, void* values, int64_t* indices, cudaStream_t stream);

// indices and values [groups, k], counts [groups], parents [groups, refill_to]. finished, lengths and
// dedup_keys may be nullptr; lengths of `length_type` count only when length_penalty != 0.
void launch_beam_prune(ScoreType dtype, const void* scores, GroupLayout layout, int64_t k, const bool* finished,
                       LengthType length_type, const void* lengths, double length_penalty, const int64_t* dedup_keys,
                       int64_t refill_to, int64_t* indices, float* values, int64_t* counts, int64_t* parents,
                       cudaStream_t stream);

// ancestors [groups, num_samples] (flat indices). status holds two int64 the launcher resets to -1: the
// kernel leaves there the lowest group holding a NaN log-weight and the lowest group with no finite
// log-weight (empty or all -inf); the ancestors of such groups are unspecified.
void launch_resample(ScoreType dtype, const void* log_weights, GroupLayout layout, int64_t num_samples,
                     ResampleMethod method, uint64_t seed, int64_t* ancestors, int64_t* status, cudaStream_t stream);

// ess [groups] float32; 0 for a group that is empty or has no finite maximum.
void launch_effective_sample_size(ScoreType dtype, const void* log_weights, GroupLayout layout, float* ess,
                                  cudaStream_t stream);

// winners [groups]. scores (of score_type) may be nullptr in majority mode, mask may be nullptr.
void launch_vote(const int64_t* answer_keys, ScoreType score_type, const void* scores, const bool* mask,
                 GroupLayout layout, VoteMode mode, int64_t* winners, cudaStream_t stream);

// keys [sequences] from token_ids [total] (int32 when int32_tokens, else int64) split by offsets.
void launch_sequence_keys(const void* token_ids, bool int32_tokens, const int64_t* offsets, int64_t sequences,
                          int64_t total, int64_t* keys, cudaStream_t stream);

}  // namespace fastsearch::gpu
