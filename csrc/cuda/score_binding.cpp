// CUDA implementations of the scoring ops (schemas: fastsearch/ops/score.py): argument checks, inputs,
// outputs, stream and device, then the launchers of score.cu, one kernel launch per op.
//
// Device syncs. The shared checks (common/score_checks.h) read index and offset values only where they
// live on the CPU. On the GPU the kernels check them on the way and leave what they find in status words
// (cuda/score_launchers.h); the binding reads those back with one device sync and raises the Python
// checks' errors, in their order:
// - prm_step_scores and prm_scores, whenever S > 0: step_positions must lie in [0, T).
// - prm_scores always, and aggregate_steps on ragged input when `empty` is absent: step_offsets must
//   start at 0, end at S and be non-decreasing, and without `empty` every candidate needs a step.
// aggregate_steps with `empty` (or dense), cosine_scores and ensemble_scores never sync: their offsets
// and weights go unchecked on the GPU. The kernels clamp every range into its array, so bad values there
// give wrong scores, never a stray access.
//
// The hidden states are read in place when their rows are contiguous (any row stride): a PRM reads S of
// the T rows, so copying all of them would cost more than the op.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/score_checks.h"
#include "cuda/binding.h"
#include "cuda/score_launchers.h"

namespace fastsearch {
namespace {

// The launchers' type code of scores that check_scores accepted.
gpu::ScoreType score_type_of(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? gpu::ScoreType::kFloat64 : gpu::score_type(gpu::dtype_of(tensor));
}

// step_offsets must hold N + 1 >= 1 values; a shape, so checked here on every device.
void check_offsets_not_empty(const at::Tensor& step_offsets, int64_t steps) {
  TORCH_CHECK_VALUE(step_offsets.numel() >= 1, "offsets must start at 0 and end at S=", steps,
                    ", got None ... None");
}

// The one sync of a call: reads the kernel's status words and raises what they report.
void report_status(const at::Tensor& status, bool positions, int64_t tokens, bool offsets, int64_t steps) {
  const at::Tensor found = status.narrow(0, 0, gpu::kStatusWords).cpu();
  const int64_t* words = found.const_data_ptr<int64_t>();
  if (positions) {
    const int64_t low = gpu::lowest_position(words);
    const int64_t high = gpu::past_end_position(words);
    TORCH_CHECK_VALUE(low >= 0 && high < 0, "step_positions must index hidden_states rows in [0, T=", tokens,
                      "), got ", low < 0 ? low : high);
  }
  if (!offsets) return;
  const int64_t first = words[gpu::kFirstOffset];
  const int64_t last = words[gpu::kLastOffset];
  TORCH_CHECK_VALUE(first == 0 && last == steps, "offsets must start at 0 and end at S=", steps, ", got ",
                    first, " ... ", last);
  TORCH_CHECK_VALUE(words[gpu::kDecreasing] == 0, "offsets must be non-decreasing");
  const int64_t empty_candidate = gpu::first_empty_candidate(words);
  if (empty_candidate >= 0) report_empty_candidate(empty_candidate);
}

// Hidden states whose rows are contiguous, as they are (a copy otherwise).
at::Tensor rows_contiguous(const at::Tensor& hidden_states) {
  return hidden_states.size(1) <= 1 || hidden_states.stride(1) == 1 ? hidden_states : hidden_states.contiguous();
}

gpu::PrmInput prm_input(const at::Tensor& hidden, const at::Tensor& positions) {
  return gpu::PrmInput{gpu::dtype_of(hidden), hidden.const_data_ptr(), hidden.size(0), hidden.size(1),
                       hidden.stride(0),      positions.const_data_ptr<int64_t>(), positions.numel()};
}

// `bias` may be undefined (no bias).
gpu::PrmHead prm_head(const at::Tensor& weight, const at::Tensor& bias, int64_t positive_index, int64_t activation) {
  return gpu::PrmHead{weight.const_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
                      static_cast<int32_t>(weight.size(0)), static_cast<int32_t>(positive_index),
                      static_cast<gpu::Activation>(activation)};
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->contiguous() : at::Tensor();
}

at::Tensor prm_step_scores_cuda(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                                const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                                int64_t positive_index, int64_t activation) {
  check_prm_step_scores_args(hidden_states, step_positions, head_weight, head_bias, positive_index, activation);
  const c10::cuda::CUDAGuard device_guard(hidden_states.device());
  const at::Tensor hidden = rows_contiguous(hidden_states);
  const at::Tensor positions = step_positions.contiguous();
  const at::Tensor weight = head_weight.contiguous();
  const at::Tensor bias = contiguous_or_undefined(head_bias);
  const auto options = hidden.options().dtype(at::kFloat);
  at::Tensor step_scores = at::empty({positions.numel()}, options);
  at::Tensor status = at::empty({gpu::kStatusWords}, options.dtype(at::kLong));
  gpu::launch_prm_step_scores(prm_input(hidden, positions), prm_head(weight, bias, positive_index, activation),
                              step_scores.mutable_data_ptr<float>(), status.mutable_data_ptr<int64_t>(),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (positions.numel() > 0) report_status(status, true, hidden.size(0), false, 0);
  return step_scores;
}

at::Tensor aggregate_steps_cuda(const at::Tensor& step_scores, const std::optional<at::Tensor>& step_offsets,
                                int64_t how, std::optional<double> empty) {
  check_aggregate_steps_args(step_scores, step_offsets, how, empty);
  const c10::cuda::CUDAGuard device_guard(step_scores.device());
  const at::Tensor scores = step_scores.contiguous();
  const bool ragged = step_offsets.has_value();
  if (ragged) check_offsets_not_empty(*step_offsets, scores.numel());
  const at::Tensor offsets = contiguous_or_undefined(step_offsets);
  const int64_t candidates = ragged ? offsets.numel() - 1 : scores.size(0);
  const int64_t steps_per_candidate = ragged ? 0 : scores.size(1);
  // Ragged candidates without `empty` are checked by the kernel: one sync.
  const bool checked = ragged && !empty.has_value();
  const auto options = scores.options().dtype(at::kFloat);
  at::Tensor out = at::empty({candidates}, options);
  at::Tensor status = checked ? at::empty({gpu::kStatusWords}, options.dtype(at::kLong)) : at::Tensor();
  gpu::launch_aggregate_steps(score_type_of(scores), scores.const_data_ptr(),
                              ragged ? offsets.const_data_ptr<int64_t>() : nullptr, candidates, steps_per_candidate,
                              scores.numel(), static_cast<gpu::Aggregation>(how), empty.has_value(),
                              static_cast<float>(empty.value_or(0.0)),
                              out.mutable_data_ptr<float>(), checked ? status.mutable_data_ptr<int64_t>() : nullptr,
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (checked) report_status(status, false, 0, true, scores.numel());
  return out;
}

std::tuple<at::Tensor, at::Tensor> prm_scores_cuda(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                                                   const at::Tensor& step_offsets, const at::Tensor& head_weight,
                                                   const std::optional<at::Tensor>& head_bias, int64_t positive_index,
                                                   int64_t activation, int64_t how, std::optional<double> empty) {
  check_prm_scores_args(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                        activation, how, empty);
  check_offsets_not_empty(step_offsets, step_positions.numel());
  const c10::cuda::CUDAGuard device_guard(hidden_states.device());
  const at::Tensor hidden = rows_contiguous(hidden_states);
  const at::Tensor positions = step_positions.contiguous();
  const at::Tensor offsets = step_offsets.contiguous();
  const at::Tensor weight = head_weight.contiguous();
  const at::Tensor bias = contiguous_or_undefined(head_bias);
  const int64_t candidates = offsets.numel() - 1;
  const auto options = hidden.options().dtype(at::kFloat);
  at::Tensor candidate_scores = at::empty({candidates}, options);
  at::Tensor step_scores = at::empty({positions.numel()}, options);
  at::Tensor workspace = at::empty({gpu::prm_scores_workspace_words(candidates)}, options.dtype(at::kLong));
  gpu::launch_prm_scores(prm_input(hidden, positions), prm_head(weight, bias, positive_index, activation),
                         offsets.const_data_ptr<int64_t>(), candidates, static_cast<gpu::Aggregation>(how),
                         empty.has_value(), static_cast<float>(empty.value_or(0.0)),
                         candidate_scores.mutable_data_ptr<float>(), step_scores.mutable_data_ptr<float>(),
                         workspace.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  report_status(workspace, positions.numel() > 0, hidden.size(0), true, positions.numel());
  return {candidate_scores, step_scores};
}

at::Tensor cosine_scores_cuda(const at::Tensor& embeddings, const at::Tensor& references,
                              const std::optional<at::Tensor>& offsets) {
  check_cosine_scores_args(embeddings, references, offsets);
  const c10::cuda::CUDAGuard device_guard(embeddings.device());
  const at::Tensor rows = embeddings.contiguous();
  const at::Tensor refs = references.contiguous();
  const at::Tensor bounds = contiguous_or_undefined(offsets);
  gpu::ReferenceLayout layout = gpu::ReferenceLayout::kPairwise;
  if (refs.dim() == 1) {
    layout = gpu::ReferenceLayout::kOne;
  } else if (offsets.has_value()) {
    layout = gpu::ReferenceLayout::kGrouped;
  }
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kFloat));
  // No group for N > 0 rows: offsets that only a GPU leaves unchecked. No reference row exists to read.
  if (layout == gpu::ReferenceLayout::kGrouped && bounds.numel() == 1) return out.fill_(NAN);
  gpu::launch_cosine_scores(gpu::dtype_of(rows), rows.const_data_ptr(), rows.size(0), rows.size(1),
                            refs.const_data_ptr(), layout,
                            offsets.has_value() ? bounds.const_data_ptr<int64_t>() : nullptr,
                            offsets.has_value() ? bounds.numel() - 1 : 0, out.mutable_data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ensemble_scores_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t how,
                                const std::optional<at::Tensor>& weights) {
  check_ensemble_scores_args(scores, offsets, how, weights);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const at::Tensor x = scores.contiguous();
  const at::Tensor bounds = contiguous_or_undefined(offsets);
  const at::Tensor w = contiguous_or_undefined(weights);
  const int64_t groups = offsets.has_value() ? bounds.numel() - 1 : 1;
  TORCH_CHECK_VALUE(groups <= std::numeric_limits<int32_t>::max(), "the CUDA kernels take fewer than 2^31 groups, got ",
                    groups);
  at::Tensor out = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  // No group for N > 0 candidates: offsets that only a GPU leaves unchecked; nothing is ranked.
  if (groups == 0) return out.fill_(NAN);
  gpu::launch_ensemble_scores(score_type_of(x), x.const_data_ptr(), x.size(0), x.size(1),
                              offsets.has_value() ? bounds.const_data_ptr<int64_t>() : nullptr, groups,
                              static_cast<gpu::EnsembleMethod>(how),
                              weights.has_value() ? w.const_data_ptr<float>() : nullptr,
                              out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) {
  m.impl("prm_step_scores", &prm_step_scores_cuda);
  m.impl("aggregate_steps", &aggregate_steps_cuda);
  m.impl("prm_scores", &prm_scores_cuda);
  m.impl("cosine_scores", &cosine_scores_cuda);
  m.impl("ensemble_scores", &ensemble_scores_cuda);
}

}  // namespace fastsearch
