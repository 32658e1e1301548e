// Argument checks of the selection ops (schemas: fastsearch/ops/select.py), shared by the CPU kernels and
// the CUDA bindings. Same conditions, order and messages as the Python checks there: ValueError
// (TORCH_CHECK_VALUE) for shapes, sizes and values, TypeError (TORCH_CHECK_TYPE) for dtypes, each naming
// its argument. Offset values are checked only where the offsets live on the CPU (on a GPU that would
// need a device sync). resample's data checks (NaN, groups without a finite log-weight) run inside the
// kernels; report_resample_errors turns what they found into the Python check's errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <initializer_list>
#include <optional>

#include "common/checks.h"

namespace fastsearch {

// Dense [G, C] without offsets, or flat [T] with int64 offsets [G + 1] (0 ... T, non-decreasing).
inline void check_groups(const char* name, const at::Tensor& values, const std::optional<at::Tensor>& offsets) {
  if (!offsets.has_value()) {
    TORCH_CHECK_VALUE(values.dim() == 2, name, " must be [G, C] (or flat [T] with offsets), got shape ",
                      values.sizes());
    return;
  }
  TORCH_CHECK_TYPE(offsets->scalar_type() == at::kLong, "offsets must be an int64 tensor, got ",
                   python_dtype(offsets->scalar_type()));
  TORCH_CHECK_VALUE(offsets->dim() == 1 && offsets->numel() >= 1, "offsets must have shape [G + 1], got ",
                    offsets->sizes());
  TORCH_CHECK_VALUE(values.dim() == 1, name, " must be flat [T] when offsets are given, got shape ", values.sizes());
  TORCH_CHECK_VALUE(offsets->device() == values.device(), "offsets is on ", offsets->device(), " but ", name,
                    " is on ", values.device());
  if (offsets->is_cpu()) {
    const auto bounds = offsets->accessor<int64_t, 1>();
    const int64_t last = bounds.size(0) - 1;
    TORCH_CHECK_VALUE(bounds[0] == 0 && bounds[last] == values.numel(), "offsets must start at 0 and end at T=",
                      values.numel(), ", got ", bounds[0], " ... ", bounds[last]);
    for (int64_t g = 0; g < last; ++g) {
      TORCH_CHECK_VALUE(bounds[g + 1] >= bounds[g], "offsets must be non-decreasing");
    }
  }
}

// An optional tensor laid out like the scores (`values`), of one of `dtypes` (described as `kind`).
inline void check_like_groups(const char* name, const std::optional<at::Tensor>& tensor, const at::Tensor& values,
                              std::initializer_list<at::ScalarType> dtypes, const char* kind) {
  if (!tensor.has_value()) return;
  bool allowed = false;
  for (const at::ScalarType dtype : dtypes) allowed = allowed || tensor->scalar_type() == dtype;
  TORCH_CHECK_TYPE(allowed, name, " must be ", kind, ", got ", python_dtype(tensor->scalar_type()));
  TORCH_CHECK_VALUE(tensor->sizes() == values.sizes(), name, " has shape ", tensor->sizes(),
                    " but the scores have shape ", values.sizes());
  TORCH_CHECK_VALUE(tensor->device() == values.device(), name, " is on ", tensor->device(),
                    " but the scores are on ", values.device());
}

inline void check_scores(const char* name, const at::Tensor& scores) {
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, name,
                   " must be a floating-point tensor, got ", python_dtype(dtype));
}

inline void check_at_least_one(const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value >= 1, name, " must be at least 1, got ", value);
}

inline void check_segmented_topk_args(const at::Tensor& scores, const std::optional<at::Tensor>& offsets,
                                      const std::optional<at::Tensor>& mask, int64_t k) {
  check_scores("scores", scores);
  check_groups("scores", scores, offsets);
  check_like_groups("mask", mask, scores, {at::kBool}, "bool");
  check_at_least_one("k", k);
}

inline void check_beam_prune_args(const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t k,
                                  const std::optional<at::Tensor>& finished, const std::optional<at::Tensor>& lengths,
                                  double length_penalty, const std::optional<at::Tensor>& dedup_keys,
                                  int64_t refill_to) {
  check_scores("scores", scores);
  check_groups("scores", scores, offsets);
  check_at_least_one("k", k);
  TORCH_CHECK_VALUE(std::isfinite(length_penalty), "length_penalty must be finite, got ", length_penalty);
  check_like_groups("finished", finished, scores, {at::kBool}, "bool");
  check_like_groups("lengths", lengths, scores,
                    {at::kLong, at::kInt, at::kShort, at::kChar, at::kByte, at::kFloat, at::kDouble}, "numeric");
  check_like_groups("dedup_keys", dedup_keys, scores, {at::kLong}, "int64");
  TORCH_CHECK_VALUE(refill_to >= 0, "refill_to must be non-negative, got ", refill_to);
}

inline void check_log_weights(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets) {
  check_scores("log_weights", log_weights);
  check_groups("log_weights", log_weights, offsets);
}

// The argument checks of resample; the kernels check the data (see report_resample_errors).
inline void check_resample_args(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets,
                                int64_t num_samples, int64_t method) {
  check_log_weights(log_weights, offsets);
  check_at_least_one("num_samples", num_samples);
  TORCH_CHECK_VALUE(method >= 0 && method <= 3, "method must be 0..3, got ", method);
}

// What a resample kernel found: the lowest group holding a NaN or +inf log-weight (not a weight) and the
// lowest group with no finite log-weight (empty or all -inf), each -1 when there is none. The first is
// reported first, as in Python.
inline void report_resample_errors(int64_t first_nan_group, int64_t first_dead_group) {
  TORCH_CHECK_VALUE(first_nan_group < 0, "log_weights contain NaN or +inf (group ", first_nan_group,
                    "): a log-weight must be a number below +inf");
  TORCH_CHECK_VALUE(first_dead_group < 0, "log_weights: group ", first_dead_group,
                    " has no candidate with finite log-weight (all -inf or empty): nothing to resample from");
}

inline void check_effective_sample_size_args(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets) {
  check_log_weights(log_weights, offsets);
}

inline void check_vote_args(const at::Tensor& answer_keys, const std::optional<at::Tensor>& scores,
                            const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& mask,
                            int64_t mode) {
  TORCH_CHECK_TYPE(answer_keys.scalar_type() == at::kLong, "answer_keys must be an int64 tensor, got ",
                   python_dtype(answer_keys.scalar_type()));
  check_groups("answer_keys", answer_keys, offsets);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "method must be 0 (majority), 1 (weighted) or 2 (max), got ", mode);
  TORCH_CHECK_VALUE(mode == 0 || scores.has_value(), "weighted and max voting need scores");
  if (scores.has_value()) {
    check_scores("scores", *scores);
    check_like_groups("scores", scores, answer_keys, {scores->scalar_type()}, "floating-point");
  }
  check_like_groups("mask", mask, answer_keys, {at::kBool}, "bool");
}

inline void check_sequence_keys_args(const at::Tensor& token_ids, const at::Tensor& offsets) {
  TORCH_CHECK_TYPE(token_ids.scalar_type() == at::kLong || token_ids.scalar_type() == at::kInt,
                   "token_ids must be an int64 or int32 tensor, got ", python_dtype(token_ids.scalar_type()));
  check_groups("token_ids", token_ids, offsets);
}

}  // namespace fastsearch
