// Device helpers shared by the .cu files: storage <-> fp32 conversion, packed accesses, the Gaussian
// stream of common/philox.h, and the switch from a DType code to a storage type. CUDA only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/philox.h"
#include "cuda/launchers.h"

// A runtime call (a memset, a query) that the launch after it depends on: when it fails the launcher returns
// at once, launching nothing, and the error stays the thread's last error, which the binding's
// C10_CUDA_KERNEL_LAUNCH_CHECK() (cudaGetLastError) raises (launchers.h). No torch header here, so no
// C10_CUDA_CHECK.
#define FASTSEARCH_CUDA_OR_RETURN(call)   \
  do {                                    \
    if ((call) != cudaSuccess) return;    \
  } while (0)

namespace fastsearch::gpu {

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// kCount values that move with one load or store instruction when the address is aligned to the pack.
template <typename T, int kCount>
struct alignas(sizeof(T) * kCount) Pack {
  T values[kCount];
};

template <typename PackType, typename T>
__host__ __device__ __forceinline__ bool is_aligned_for(const T* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % alignof(PackType) == 0;
}

// max(value, low) that keeps a NaN, like torch.clamp(min=low).
__device__ __forceinline__ float clamp_min(float value, float low) { return value < low ? low : value; }

// Normals z_(4 counter) ... z_(4 counter + 3) of the stream under `seed`. Accurate logf / sincosf /
// sqrtf (never the fast intrinsics) so that every backend agrees to 1e-5.
__device__ __forceinline__ void stream_normals(uint64_t seed, uint64_t counter, float (&normals)[4]) {
  const Philox4 block = philox_block(seed, counter);
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float radius = sqrtf(-2.0f * logf(uint_to_unit_open(block.r[2 * pair])));
    const float angle = uint_to_unit_open(block.r[2 * pair + 1]) * kTwoPi;
    float sine, cosine;
    sincosf(angle, &sine, &cosine);
    normals[2 * pair] = radius * cosine;
    normals[2 * pair + 1] = radius * sine;
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<T>{}) with the storage type T of `dtype`.
template <typename Body>
void dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      body(TypeTag<float>{});
      break;
    case DType::kFloat16:
      body(TypeTag<__half>{});
      break;
    case DType::kBFloat16:
      body(TypeTag<__nv_bfloat16>{});
      break;
  }
}

inline unsigned int blocks_for(int64_t work, int64_t work_per_block) {
  return static_cast<unsigned int>((work + work_per_block - 1) / work_per_block);
}

}  // namespace fastsearch::gpu
