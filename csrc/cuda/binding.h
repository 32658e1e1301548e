// Torch-side helpers shared by the CUDA bindings (*_binding.cpp): compiled only where torch has CUDA.
#pragma once

#include <ATen/ATen.h>

#include "cuda/launchers.h"

namespace fastsearch::gpu {

// The launchers' dtype code of a tensor that check_sample accepted (float32, float16 or bfloat16).
inline DType dtype_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

}  // namespace fastsearch::gpu
