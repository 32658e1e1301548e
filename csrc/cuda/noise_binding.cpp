// CUDA implementations of randn_fill_ and zo_neighbors (schemas: fastsearch/ops/noise.py): argument
// checks, contiguous inputs, outputs and scratch, stream and device, then the launchers of noise.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "common/op_checks.h"
#include "cuda/binding.h"
#include "cuda/launchers.h"

namespace fastsearch {
namespace {

void randn_fill_cuda(at::Tensor out, int64_t seed, int64_t offset) {
  check_randn_fill_args(out, seed, offset);
  const c10::cuda::CUDAGuard device_guard(out.device());
  gpu::launch_randn_fill(gpu::dtype_of(out), out.mutable_data_ptr(), out.numel(), static_cast<uint64_t>(seed),
                         static_cast<uint64_t>(offset), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor zo_neighbors_cuda(const at::Tensor& pivot, int64_t num_neighbors, double cos_sim, int64_t seed) {
  check_zo_neighbors_args(pivot, num_neighbors, cos_sim, seed);
  const c10::cuda::CUDAGuard device_guard(pivot.device());
  const at::Tensor x = pivot.contiguous();
  const int64_t batch = x.size(0);
  const int64_t dim = batch == 0 ? 0 : x.numel() / batch;
  std::vector<int64_t> out_shape{batch, num_neighbors};
  out_shape.insert(out_shape.end(), x.sizes().begin() + 1, x.sizes().end());
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor workspace =
      at::empty({gpu::zo_neighbors_workspace_floats(batch * num_neighbors, dim)}, x.options().dtype(at::kFloat));
  gpu::launch_zo_neighbors(gpu::dtype_of(x), x.const_data_ptr(), batch, num_neighbors, dim, cos_sim,
                           static_cast<uint64_t>(seed), workspace.mutable_data_ptr<float>(), out.mutable_data_ptr(),
                           c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) {
  m.impl("randn_fill_", &randn_fill_cuda);
  m.impl("zo_neighbors", &zo_neighbors_cuda);
}

}  // namespace fastsearch
