// Kernels with one planted defect each, of every kind the CUDA emulation claims to catch, beside correct
// twins: tests/test_cuda_emulation.py runs them through fs_emu_defects::run(name, input) and checks that
// each defect is reported (a launch error) or shows in the result, and that each twin is right. Compiled
// only for the emulation (tests/cuda_emu/emulation.py), with its launch and __shared__ rewriting.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>

namespace fs_emu_defects {
namespace {

constexpr int kThreads = 64;
using Reduce = cub::BlockReduce<float, kThreads>;

// Threads past `n` leave before a barrier the others wait at.
__global__ void early_exit(const float* in, float* out, int n) {
  __shared__ float tile[kThreads];
  if (static_cast<int>(threadIdx.x) >= n) return;
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 1) % n];
}

// Even and odd threads wait at different __syncthreads.
__global__ void divergent_barrier(const float*, float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// Lanes 0-15 read lane 20, which is outside their mask.
__global__ void shuffle_outside_mask(const float* in, float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_sync(0x0000FFFFu, in[threadIdx.x], 20);
}

// A full-mask shuffle that only half of each warp reaches.
__global__ void divergent_shuffle(const float* in, float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, in[threadIdx.x], 1);
}

// The two halves of a warp name different masks for one shuffle.
__global__ void mismatched_masks(const float* in, float* out) {
  const unsigned mask = threadIdx.x % 32 < 16 ? 0xFFFFFFFFu : 0xFFFF0000u;
  out[threadIdx.x] = __shfl_down_sync(mask, in[threadIdx.x], 1);
}

// Every lane calls a shuffle whose mask names lane 0 only.
__global__ void caller_outside_mask(const float* in, float* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, in[threadIdx.x], 0);
}

// Half a warp waits at a shuffle, the other half at __syncthreads: neither can go on.
__global__ void shuffle_against_barrier(const float* in, float* out) {
  if (threadIdx.x % 32 < 16) {
    out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, in[threadIdx.x], 0);
  } else {
    __syncthreads();
  }
}

// A correct warp reduction (the twin of the three above): every lane gets the sum of its warp.
__global__ void warp_sum(const float* in, float* out) {
  float value = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  out[threadIdx.x] = value;
}

// out[0] = sum, out[1] = max, through one TempStorage; kBarrier false leaves out the barrier that CUB asks
// for between the two uses.
template <bool kBarrier>
__global__ void temp_storage_reuse(const float* in, float* out) {
  __shared__ typename Reduce::TempStorage temp;
  const float sum = Reduce(temp).Sum(in[threadIdx.x]);
  if (kBarrier) __syncthreads();
  const float top = Reduce(temp).Reduce(2.0f * in[threadIdx.x], cub::Max{});
  if (threadIdx.x == 0) {
    out[0] = sum;
    out[1] = top;
  }
}

// Every thread stores BlockReduce's result, which only thread 0 holds.
__global__ void reduce_result_everywhere(const float* in, float* out) {
  __shared__ typename Reduce::TempStorage temp;
  out[threadIdx.x] = Reduce(temp).Sum(in[threadIdx.x]);
}

// Thread 0 adds to a shared counter nobody set.
__global__ void uninitialised_shared(const float* in, float* out) {
  __shared__ float total;
  if (threadIdx.x == 0) total += in[0];
  __syncthreads();
  if (threadIdx.x == 0) out[0] = total;
}

// Reverses through shared memory; kBarrier false reads the partner's slot with no barrier after the writes.
template <bool kBarrier>
__global__ void reverse(const float* in, float* out) {
  __shared__ float tile[kThreads];
  tile[threadIdx.x] = in[threadIdx.x];
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// A CUB collective for 64 threads run by a block of another size.
__global__ void wrong_block_size(const float* in, float* out) {
  __shared__ typename Reduce::TempStorage temp;
  const float sum = Reduce(temp).Sum(in[threadIdx.x]);
  if (threadIdx.x == 0) out[0] = sum;
}

// Reads one element past the input: only the AddressSanitizer build sees it (emulation.py).
__global__ void read_past_end(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// Writes one slot past a shared array: only the AddressSanitizer build sees it.
__global__ void shared_past_end(const float* in, float* out) {
  __shared__ float tile[kThreads];
  tile[threadIdx.x + 1] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

at::Tensor run(const std::string& name, const at::Tensor& input) {
  TORCH_CHECK(input.is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 1 && input.is_contiguous(),
              "input must be a contiguous 1-d float32 CPU tensor");
  const int threads = static_cast<int>(input.numel());
  at::Tensor out = at::zeros_like(input);
  const float* in = input.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  using Launch = void (*)(const float*, float*, int);
  static const std::pair<const char*, Launch> kKernels[] = {
      {"early_exit", [](const float* i, float* o, int n) { early_exit<<<1, kThreads>>>(i, o, n); }},
      {"divergent_barrier", [](const float* i, float* o, int n) { divergent_barrier<<<1, n>>>(i, o); }},
      {"shuffle_outside_mask", [](const float* i, float* o, int n) { shuffle_outside_mask<<<1, n>>>(i, o); }},
      {"divergent_shuffle", [](const float* i, float* o, int n) { divergent_shuffle<<<1, n>>>(i, o); }},
      {"mismatched_masks", [](const float* i, float* o, int n) { mismatched_masks<<<1, n>>>(i, o); }},
      {"warp_sum", [](const float* i, float* o, int n) { warp_sum<<<1, n>>>(i, o); }},
      {"read_past_end", [](const float* i, float* o, int n) { read_past_end<<<1, n>>>(i, o); }},
      {"shared_past_end", [](const float* i, float* o, int n) { shared_past_end<<<1, n>>>(i, o); }},
      {"caller_outside_mask", [](const float* i, float* o, int n) { caller_outside_mask<<<1, n>>>(i, o); }},
      {"shuffle_against_barrier", [](const float* i, float* o, int n) { shuffle_against_barrier<<<1, n>>>(i, o); }},
      {"too_many_threads", [](const float* i, float* o, int) { warp_sum<<<1, 2048>>>(i, o); }},
      {"dynamic_shared_memory", [](const float* i, float* o, int n) { warp_sum<<<1, n, 128>>>(i, o); }},
      {"temp_storage_reuse", [](const float* i, float* o, int n) { temp_storage_reuse<true><<<1, n>>>(i, o); }},
      {"temp_storage_reuse_without_barrier",
       [](const float* i, float* o, int n) { temp_storage_reuse<false><<<1, n>>>(i, o); }},
      {"reduce_result_everywhere", [](const float* i, float* o, int n) { reduce_result_everywhere<<<1, n>>>(i, o); }},
      {"uninitialised_shared", [](const float* i, float* o, int n) { uninitialised_shared<<<1, n>>>(i, o); }},
      {"reverse", [](const float* i, float* o, int n) { reverse<true><<<1, n>>>(i, o); }},
      {"reverse_without_barrier", [](const float* i, float* o, int n) { reverse<false><<<1, n>>>(i, o); }},
      {"wrong_block_size", [](const float* i, float* o, int n) { wrong_block_size<<<1, n>>>(i, o); }},
  };
  const auto found = std::find_if(std::begin(kKernels), std::end(kKernels),
                                  [&](const auto& entry) { return name == entry.first; });
  TORCH_CHECK(found != std::end(kKernels), "no kernel named ", name);
  found->second(in, o, threads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fs_emu_defects

TORCH_LIBRARY(fs_emu_defects, m) { m.def("run(str name, Tensor input) -> Tensor", &fs_emu_defects::run); }
