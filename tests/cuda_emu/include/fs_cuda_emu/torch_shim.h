// What the CUDA bindings (csrc/cuda/*_binding.cpp) use of c10/cuda, for the CUDA emulation: the tensors are
// CPU tensors, the stream is the emulation's only one, a launch error raises as C10_CUDA_KERNEL_LAUNCH_CHECK
// would. The bindings' TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) blocks register in the namespace
// fastsearch_cuda_emu for the CPU key instead (tests/cuda_emu/loader.py defines its schemas, copies of
// fastsearch's), so that the emulated kernels sit beside the real CPU ones.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "fs_cuda_emu/runtime.h"

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "the CUDA emulation runs on CPU tensors, got a tensor on ", device);
  }
};

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }

}  // namespace c10::cuda

#define C10_CUDA_CHECK(expression)                                           \
  do {                                                                        \
    const cudaError_t fs_emu_error = (expression);                            \
    TORCH_CHECK(fs_emu_error == cudaSuccess, cudaGetErrorString(fs_emu_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(fastsearch_cuda_emu, CPU, m, C10_UID)
