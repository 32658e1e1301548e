// Argument checks shared by the CPU kernels and the CUDA bindings. Each failure raises ValueError
// (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) with the argument's name, before any kernel runs.
// The Python backends run the same checks in fastsearch/ops/_common.py.
#pragma once

#include <ATen/core/Tensor.h>
// The CUDA bindings (built into _C only) reach at::empty through these headers. The CPU kernels, compiled
// once per capability, include only what they use: <ATen/ATen.h> costs each of their builds seconds.
#if defined(FASTSEARCH_WITH_CUDA)
#include <ATen/ATen.h>
#endif

#include <optional>
#include <string>

#include "common/schedule.h"

namespace fastsearch {

// A dtype as Python writes it ("torch.float16"), so that the messages read as the Python checks' do.
inline std::string python_dtype(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// A tensor the kernels read or write: defined (a required tensor passed as None arrives undefined), with data
// (not meta), float32, float16 or bfloat16.
inline void check_float_dtype(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_TYPE(tensor.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(!tensor.is_meta(), name, " is on meta: a meta tensor holds no data for a kernel to read");
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", python_dtype(dtype));
}

inline void check_sample(const at::Tensor& sample, const char* name = "sample") {
  check_float_dtype(sample, name);
  TORCH_CHECK_VALUE(sample.dim() >= 1, name, " must have a batch dimension, got a 0-d tensor");
}

// `tensor` must look exactly like `sample`: same dtype, shape and device.
inline void check_like(const at::Tensor& tensor, const at::Tensor& sample, const char* name) {
  TORCH_CHECK_TYPE(tensor.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(tensor.scalar_type() == sample.scalar_type(), name, " has dtype ",
                   python_dtype(tensor.scalar_type()), " but sample has dtype ", python_dtype(sample.scalar_type()));
  TORCH_CHECK_VALUE(tensor.sizes() == sample.sizes(), name, " has shape ", tensor.sizes(),
                    " but sample has shape ", sample.sizes());
  TORCH_CHECK_VALUE(tensor.device() == sample.device(), name, " is on ", tensor.device(),
                    " but sample is on ", sample.device());
}

inline void check_schedule(const std::optional<at::Tensor>& tensor, const at::Tensor& sample, const char* name) {
  if (!tensor.has_value()) return;
  TORCH_CHECK_TYPE(tensor->scalar_type() == at::kFloat, name, " must be float32, got ",
                   python_dtype(tensor->scalar_type()));
  TORCH_CHECK_VALUE(tensor->device() == sample.device(), name, " is on ", tensor->device(),
                    " but sample is on ", sample.device());
  TORCH_CHECK_VALUE(tensor->dim() == 1 && (tensor->numel() == 1 || tensor->numel() == sample.size(0)), name,
                    " must hold 1 or B=", sample.size(0), " values (one per sample), got shape ", tensor->sizes());
}

inline void check_noise(const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                        const at::Tensor& sample, bool required) {
  TORCH_CHECK_VALUE(!(noise.has_value() && seed.has_value()), "give noise or seed, not both");
  if (noise.has_value()) {
    check_like(*noise, sample, "noise");
  } else {
    TORCH_CHECK_VALUE(!required || seed.has_value(),
                      "this step draws noise: pass noise= (a tensor) or seed= (an int)");
  }
  if (seed.has_value()) TORCH_CHECK_VALUE(*seed >= 0, "seed must be in [0, 2**63), got ", *seed);
}

// The kernel view of a checked (Tensor? t, float value) schedule pair. `contiguous` must outlive the
// kernel call: it holds the values when `tensor` was not contiguous.
inline ScheduleValue schedule_value(const std::optional<at::Tensor>& tensor, double value, at::Tensor& contiguous) {
  if (!tensor.has_value()) return ScheduleValue{nullptr, 0, static_cast<float>(value)};
  contiguous = tensor->contiguous();
  return ScheduleValue{contiguous.data_ptr<float>(), contiguous.numel() == 1 ? 0 : 1, 0.0f};
}

}  // namespace fastsearch
