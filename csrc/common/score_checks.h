// Argument checks of the scoring ops (schemas: fastsearch/ops/score.py), shared by the CPU kernels and the
// CUDA binding. Same conditions, order and messages as the Python checks there: ValueError
// (TORCH_CHECK_VALUE) for shapes, sizes and values, TypeError (TORCH_CHECK_TYPE) for dtypes, each naming
// its argument. Values of index, offset and weight tensors are checked only where those tensors live on
// the CPU (on a GPU that would need a device sync; the CUDA binding does its own).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/select_checks.h"

namespace fastsearch {

// head_weight holds at most this many rows (C): the kernels keep C logits per step in registers.
constexpr int64_t kMaxHeadRows = 8;
// aggregate_steps' `how`: last, min, prod, mean, max, logit_sum.
constexpr int64_t kNumAggregations = 6;

inline void check_float_data(const char* name, const at::Tensor& tensor) {
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", python_dtype(dtype));
}

inline void check_int64_vector(const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kLong, name, " must be an int64 tensor, got ",
                   python_dtype(tensor.scalar_type()));
  TORCH_CHECK_VALUE(tensor.dim() == 1, name, " must be 1-D, got shape ", tensor.sizes());
}

// `tensor` has the dtype and device of `other`.
inline void check_same(const char* name, const at::Tensor& tensor, const char* other_name, const at::Tensor& other) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == other.scalar_type(), name, " has dtype ",
                   python_dtype(tensor.scalar_type()), " but ", other_name, " has dtype ",
                   python_dtype(other.scalar_type()));
  TORCH_CHECK_VALUE(tensor.device() == other.device(), name, " is on ", tensor.device(), " but ", other_name,
                    " is on ", other.device());
}

inline void check_aggregation(int64_t how) {
  TORCH_CHECK_VALUE(how >= 0 && how < kNumAggregations, "method must be 0..", kNumAggregations - 1, ", got ", how);
}

// The error of a candidate without steps when `empty` is absent (also raised by the CUDA binding).
inline void report_empty_candidate(int64_t candidate) {
  TORCH_CHECK_VALUE(false, "candidate ", candidate, " has no steps; pass empty= to give such candidates a score");
}

// int64 [N + 1] from 0 to S, non-decreasing; a candidate without steps needs `empty`. Values are checked
// where the offsets live on the CPU.
inline void check_step_offsets(const at::Tensor& step_offsets, int64_t num_steps, std::optional<double> empty) {
  if (!step_offsets.is_cpu()) return;
  const auto bounds = step_offsets.accessor<int64_t, 1>();
  const int64_t count = bounds.size(0);
  const auto end_value = [&](int64_t i) { return count == 0 ? std::string("None") : std::to_string(bounds[i]); };
  TORCH_CHECK_VALUE(count >= 1 && bounds[0] == 0 && bounds[count - 1] == num_steps,
                    "offsets must start at 0 and end at S=", num_steps, ", got ", end_value(0), " ... ",
                    end_value(count - 1));
  int64_t first_empty = -1;
  for (int64_t n = 0; n + 1 < count; ++n) {
    TORCH_CHECK_VALUE(bounds[n + 1] >= bounds[n], "offsets must be non-decreasing");
    if (first_empty < 0 && bounds[n + 1] == bounds[n]) first_empty = n;
  }
  if (!empty.has_value() && first_empty >= 0) report_empty_candidate(first_empty);
}

inline void check_prm_step_scores_args(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                                       const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                                       int64_t positive_index, int64_t activation) {
  check_float_data("hidden_states", hidden_states);
  TORCH_CHECK_VALUE(hidden_states.dim() == 2, "hidden_states must be [T, H], got shape ", hidden_states.sizes());
  check_int64_vector("step_positions", step_positions);
  TORCH_CHECK_VALUE(step_positions.device() == hidden_states.device(), "step_positions is on ",
                    step_positions.device(), " but hidden_states is on ", hidden_states.device());
  check_float_data("head_weight", head_weight);
  check_same("head_weight", head_weight, "hidden_states", hidden_states);
  const int64_t rows = hidden_states.size(0);
  const int64_t hidden = hidden_states.size(1);
  TORCH_CHECK_VALUE(head_weight.dim() == 2 && head_weight.size(1) == hidden, "head_weight must be [C, H=", hidden,
                    "], got shape ", head_weight.sizes());
  const int64_t num_rows = head_weight.size(0);
  TORCH_CHECK_VALUE(num_rows >= 1 && num_rows <= kMaxHeadRows, "head_weight must have 1 to ", kMaxHeadRows,
                    " rows (C), got ", num_rows);
  if (head_bias.has_value()) {
    check_float_data("head_bias", *head_bias);
    check_same("head_bias", *head_bias, "hidden_states", hidden_states);
    TORCH_CHECK_VALUE(head_bias->dim() == 1 && head_bias->size(0) == num_rows, "head_bias must be [C=", num_rows,
                      "], got shape ", head_bias->sizes());
  }
  TORCH_CHECK_VALUE(activation == 0 || activation == 1, "activation must be 0 (softmax) or 1 (sigmoid), got ",
                    activation);
  TORCH_CHECK_VALUE(activation != 0 || num_rows >= 2,
                    "activation='softmax' needs at least 2 head rows (a softmax over one logit is always 1); "
                    "use activation='sigmoid' for a single-logit head");
  TORCH_CHECK_VALUE(positive_index >= 0 && positive_index < num_rows, "positive_index must be in [0, C=", num_rows,
                    "), got ", positive_index);
  if (step_positions.numel() > 0 && step_positions.is_cpu()) {
    const auto positions = step_positions.accessor<int64_t, 1>();
    int64_t low = positions[0];
    int64_t high = positions[0];
    for (int64_t s = 1; s < positions.size(0); ++s) {
      low = std::min(low, positions[s]);
      high = std::max(high, positions[s]);
    }
    TORCH_CHECK_VALUE(low >= 0 && high < rows, "step_positions must index hidden_states rows in [0, T=", rows,
                      "), got ", low < 0 ? low : high);
  }
}

inline void check_aggregate_steps_args(const at::Tensor& step_scores, const std::optional<at::Tensor>& step_offsets,
                                       int64_t how, std::optional<double> empty) {
  check_scores("step_scores", step_scores);
  check_aggregation(how);
  if (!step_offsets.has_value()) {
    TORCH_CHECK_VALUE(step_scores.dim() == 2, "step_scores must be [N, K] (or flat [S] with offsets), got shape ",
                      step_scores.sizes());
    if (!empty.has_value() && step_scores.size(1) == 0 && step_scores.size(0) > 0) report_empty_candidate(0);
    return;
  }
  check_int64_vector("offsets", *step_offsets);
  TORCH_CHECK_VALUE(step_scores.dim() == 1, "step_scores must be flat [S] when offsets are given, got shape ",
                    step_scores.sizes());
  TORCH_CHECK_VALUE(step_offsets->device() == step_scores.device(), "offsets is on ", step_offsets->device(),
                    " but step_scores is on ", step_scores.device());
  check_step_offsets(*step_offsets, step_scores.numel(), empty);
}

inline void check_prm_scores_args(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                                  const at::Tensor& step_offsets, const at::Tensor& head_weight,
                                  const std::optional<at::Tensor>& head_bias, int64_t positive_index,
                                  int64_t activation, int64_t how, std::optional<double> empty) {
  check_prm_step_scores_args(hidden_states, step_positions, head_weight, head_bias, positive_index, activation);
  check_aggregation(how);
  check_int64_vector("offsets", step_offsets);
  TORCH_CHECK_VALUE(step_offsets.device() == hidden_states.device(), "offsets is on ", step_offsets.device(),
                    " but hidden_states is on ", hidden_states.device());
  check_step_offsets(step_offsets, step_positions.numel(), empty);
}

inline void check_cosine_scores_args(const at::Tensor& embeddings, const at::Tensor& references,
                                     const std::optional<at::Tensor>& offsets) {
  check_float_data("embeddings", embeddings);
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "embeddings must be [N, D], got shape ", embeddings.sizes());
  check_float_data("references", references);
  check_same("references", references, "embeddings", embeddings);
  const int64_t num = embeddings.size(0);
  const int64_t dim = embeddings.size(1);
  TORCH_CHECK_VALUE((references.dim() == 1 || references.dim() == 2) && references.size(-1) == dim,
                    "references must be [D=", dim, "], [N, D] or [G, D], got shape ", references.sizes());
  if (!offsets.has_value()) {
    TORCH_CHECK_VALUE(references.dim() == 1 || references.size(0) == num, "references has ", references.size(0),
                      " rows but embeddings has N=", num, ": pass offsets [G + 1] to give one reference per group");
    return;
  }
  TORCH_CHECK_VALUE(references.dim() == 2, "references must be [G, D] when offsets are given, got shape ",
                    references.sizes());
  // The groups are over the N rows; a [N] view stands for them (one element a row, D = 0 included).
  const at::Tensor rows = dim > 0 ? embeddings.select(1, 0) : embeddings.new_empty({1}).expand({num});
  check_groups("embeddings", rows, offsets);
  TORCH_CHECK_VALUE(offsets->numel() - 1 == references.size(0), "offsets describe ", offsets->numel() - 1,
                    " groups but references has ", references.size(0), " rows");
}

// A float as Python's repr writes it (shortest round trip; "1.0", not "1").
inline std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, result.ptr);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

inline void check_ensemble_scores_args(const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t how,
                                       const std::optional<at::Tensor>& weights) {
  check_scores("scores", scores);
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [V, N] (one row per verifier), got shape ", scores.sizes());
  const int64_t num_verifiers = scores.size(0);
  TORCH_CHECK_VALUE(num_verifiers >= 1, "scores must hold at least one verifier (V >= 1)");
  if (offsets.has_value()) check_groups("scores", scores.select(0, 0), offsets);
  TORCH_CHECK_VALUE(how == 0 || how == 1, "method must be 0 (rank) or 1 (zscore), got ", how);
  if (!weights.has_value()) return;
  TORCH_CHECK_TYPE(weights->scalar_type() == at::kFloat, "weights must be a float32 tensor, got ",
                   python_dtype(weights->scalar_type()));
  TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == num_verifiers, "weights must be [V=", num_verifiers,
                    "], got shape ", weights->sizes());
  TORCH_CHECK_VALUE(weights->device() == scores.device(), "weights is on ", weights->device(), " but scores is on ",
                    scores.device());
  if (!weights->is_cpu()) return;
  const auto w = weights->accessor<float, 1>();
  bool valid = true;
  float sum = 0.0f;
  for (int64_t v = 0; v < num_verifiers; ++v) {
    valid = valid && std::isfinite(w[v]) && w[v] >= 0.0f;
    sum += w[v];
  }
  if (valid && sum > 0.0f) return;
  std::string listed = "[";
  for (int64_t v = 0; v < num_verifiers; ++v) listed += (v > 0 ? ", " : "") + python_float(w[v]);
  TORCH_CHECK_VALUE(false, "weights must be finite, non-negative and not all zero, got ", listed, "]");
}

}  // namespace fastsearch
