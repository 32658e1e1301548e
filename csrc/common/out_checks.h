// Checks of the out= tensors of the step ops (the `.out` overloads), shared by the CPU kernels and the CUDA
// bindings; fastsearch/ops/steps.py runs the same checks, with the same messages, for the Python backends.
//
// Why these rules make writing into `out` safe on every backend: a step is element-wise, and each element of
// every input is read before the same element of `out` is written, by the same thread; an input that is not
// contiguous is copied before the kernel starts. So `out` may be a contiguous input itself (an in-place step),
// but must not overlap one any other way, where an element written early would be read later as another
// element's input. The per-sample schedule values are read for every element of their sample, so `out` must
// not overlap them at all.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "common/checks.h"

namespace fastsearch {

enum class Overlap { kNone, kSame, kPartial };

// How the bytes of two contiguous tensors on one device overlap: kSame when they start and end together
// (the very same elements, for tensors of one dtype and shape). at::get_overlap_status would call two
// contiguous tensors whose strides differ only in size-1 dimensions a partial overlap.
inline Overlap contiguous_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return Overlap::kNone;
  const auto a_begin = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b_begin = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const uintptr_t a_end = a_begin + a.nbytes();
  const uintptr_t b_end = b_begin + b.nbytes();
  if (a_begin == b_begin && a_end == b_end) return Overlap::kSame;
  return a_begin < b_end && b_begin < a_end ? Overlap::kPartial : Overlap::kNone;
}

// `out` receives a result like `sample`: same dtype, shape and device, contiguous (written as a flat array).
inline void check_out(const at::Tensor& out, const at::Tensor& sample, const char* name) {
  check_like(out, sample, name);
  TORCH_CHECK_VALUE(out.is_contiguous(), name, " must be contiguous");
}

// `input` is read element by element alongside `out` (sample, model output, velocity, noise).
inline void check_out_input_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& input,
                                    const char* input_name) {
  if (!input.is_contiguous()) return;  // copied before the kernel reads it
  TORCH_CHECK_VALUE(contiguous_overlap(out, input) != Overlap::kPartial, out_name,
                    " overlaps ", input_name, " in part; it may be ", input_name,
                    " itself (an in-place step) or memory of its own");
}

// `schedule` holds per-sample values, read for every element of their sample.
inline void check_out_schedule_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& schedule,
                                       const char* schedule_name) {
  if (!schedule.is_contiguous()) return;  // copied before the kernel reads it
  TORCH_CHECK_VALUE(contiguous_overlap(out, schedule) == Overlap::kNone, out_name, " overlaps ",
                    schedule_name, ", which the step reads for every element of a sample");
}

// An optional input by name, for the lists below.
struct NamedInput {
  const at::Tensor* tensor;  // null: not given
  const char* name;
  NamedInput(const at::Tensor& t, const char* n) : tensor(&t), name(n) {}
  NamedInput(const std::optional<at::Tensor>& t, const char* n) : tensor(t.has_value() ? &*t : nullptr), name(n) {}
};

// Every rule above for one output: like `sample`, no partial overlap with the element-wise `inputs` (the
// sample among them), none at all with the per-sample `schedules`.
inline void check_step_out(const at::Tensor& out, const char* out_name, const at::Tensor& sample,
                           std::initializer_list<NamedInput> inputs, std::initializer_list<NamedInput> schedules) {
  check_out(out, sample, out_name);
  check_out_input_overlap(out, out_name, sample, "sample");
  for (const NamedInput& input : inputs) {
    if (input.tensor != nullptr) check_out_input_overlap(out, out_name, *input.tensor, input.name);
  }
  for (const NamedInput& schedule : schedules) {
    if (schedule.tensor != nullptr) check_out_schedule_overlap(out, out_name, *schedule.tensor, schedule.name);
  }
}

inline void check_ddim_step_out(const at::Tensor& sample, const at::Tensor& model_output,
                                const std::optional<at::Tensor>& alpha_prod_t,
                                const std::optional<at::Tensor>& alpha_prod_t_prev,
                                const std::optional<at::Tensor>& noise, const at::Tensor& prev_sample,
                                const at::Tensor& pred_original_sample) {
  constexpr const char* kPrev = "out[0] (prev_sample)";
  constexpr const char* kX0 = "out[1] (pred_original_sample)";
  for (const auto& [out, out_name] : {std::pair{&prev_sample, kPrev}, std::pair{&pred_original_sample, kX0}}) {
    check_step_out(*out, out_name, sample, {{model_output, "model_output"}, {noise, "noise"}},
                   {{alpha_prod_t, "alpha_prod_t"}, {alpha_prod_t_prev, "alpha_prod_t_prev"}});
  }
  TORCH_CHECK_VALUE(contiguous_overlap(prev_sample, pred_original_sample) == Overlap::kNone, kPrev,
                    " and ", kX0, " must not overlap");
}

inline void check_flow_euler_step_out(const at::Tensor& sample, const at::Tensor& velocity,
                                      const std::optional<at::Tensor>& sigma,
                                      const std::optional<at::Tensor>& sigma_next,
                                      const std::optional<at::Tensor>& noise, const at::Tensor& out) {
  check_step_out(out, "out", sample, {{velocity, "velocity"}, {noise, "noise"}},
                 {{sigma, "sigma"}, {sigma_next, "sigma_next"}});
}

inline void check_flow_heun_step_out(const at::Tensor& sample, const at::Tensor& velocity,
                                     const at::Tensor& velocity_next, const std::optional<at::Tensor>& sigma,
                                     const std::optional<at::Tensor>& sigma_next, const at::Tensor& out) {
  check_step_out(out, "out", sample, {{velocity, "velocity"}, {velocity_next, "velocity_next"}},
                 {{sigma, "sigma"}, {sigma_next, "sigma_next"}});
}

inline void check_renoise_out(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                              const std::optional<at::Tensor>& level_to, const std::optional<at::Tensor>& noise,
                              const at::Tensor& out) {
  check_step_out(out, "out", sample, {{noise, "noise"}}, {{level_from, "level_from"}, {level_to, "level_to"}});
}

}  // namespace fastsearch
