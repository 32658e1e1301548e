// A host emulation of the CUDA execution model, for running csrc/cuda/*.cu on a CPU in the test suite.
//
// Every CUDA thread of a block is a fiber (its own stack, switched cooperatively on one host thread); a
// fiber runs until it reaches a point where a GPU thread could wait for others: __syncthreads, a warp
// collective (__shfl_*_sync, votes, __syncwarp), a CUB block collective, an atomic or a fence. The
// scheduler then runs the other fibers, in a shuffled order per pass, and releases a barrier once every
// thread it concerns has arrived. Blocks run one after another, in a shuffled order.
//
// What it checks beyond the kernels' results (each is a launch error naming the thread and source line):
// __syncthreads reached by part of a block (others exited or wait elsewhere), divergent __syncthreads call
// sites, warp collectives whose lanes disagree on the mask or the operation, lanes named in a mask that
// exited or do not exist, shuffles that read an inactive lane, CUB collectives used by a block of another
// size. Shared memory starts every block filled with 0xFF bytes (NaN floats, -1 / max integers), so a
// kernel that reads shared memory it did not write sees garbage, as on a GPU; CUB BlockReduce results are
// poisoned outside thread 0; CUB TempStorage really holds the collective's data, so reusing it without a
// barrier corrupts results as it would on a GPU.
//
// What it cannot catch (see tests/cuda_emu/README.md): the memory model (every access is sequentially
// consistent here, so a missing fence or a race between two accesses with no blocking point between them
// goes unseen), timing and occupancy, register and shared-memory limits, the device's own rounding of
// transcendental functions (host libm here). Out-of-bounds accesses: only in the AddressSanitizer build.
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __constant__ static
// Every __shared__ declaration is rewritten by tests/cuda_emu/build.py into fs_emu::shared_var<...>(); one
// that is not (a form the rewriter does not know) must not compile silently as a per-thread variable.
#define __shared__ FASTSEARCH_CUDA_EMU_SHARED_NOT_REWRITTEN

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMultiProcessorCount = 16 };

constexpr int warpSize = 32;

namespace fs_emu {

// ---- the scheduler (runtime.cpp) -------------------------------------------------------------------------

// Where a blocking call was made: the caller's file and line (a default argument of every blocking call).
using Site = std::source_location;

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
};

inline LaunchConfig config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return LaunchConfig{grid, block, shared_bytes, stream};
}

// The calling fiber's indices and block shape.
struct ThreadPlace {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;  // x + y * bx + z * bx * by
};

namespace detail {
extern const ThreadPlace* current_place;  // the running fiber's, set by the scheduler
template <typename T>
struct Identity {
  using type = T;
};
}  // namespace detail

inline const ThreadPlace& place() { return *detail::current_place; }

// Runs body(context) as every thread of every block of the grid; returns false (and sets the error that
// cudaGetLastError reports) when the launch was refused or a check failed.
bool run_grid(const LaunchConfig& config, void (*body)(void*), void* context);

// Blocking points. A fiber calls these; each returns once the barrier it names is complete.
void block_barrier(Site site);
void yield_point();

// A warp collective: lane deposits `bits` under `mask`; returns the bits the operation gives this lane.
enum class WarpOp : int { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int lane_arg, int width, Site site);

[[noreturn]] void fail(const char* what, Site site);
// Launch-wide counter of blocks started; shared_var compares it to re-poison its storage per block.
uint64_t block_epoch();

// ---- launches --------------------------------------------------------------------------------------------

template <typename Kernel, typename Packed>
struct LaunchBody {
  Kernel kernel;
  Packed* arguments;
  static void run(void* self) {
    auto* body = static_cast<LaunchBody*>(self);
    std::apply(body->kernel, *body->arguments);
  }
};

// kernel<<<grid, block, shared, stream>>>(args...) becomes launch(config(grid, block, shared, stream),
// kernel, args...): the arguments are converted to the kernel's parameter types once, as the launch
// copies them to the device; every thread then gets its own copy.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& config, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<Params>...> packed(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  LaunchBody<void (*)(Params...), decltype(packed)> body{kernel, &packed};
  run_grid(config, &LaunchBody<void (*)(Params...), decltype(packed)>::run, &body);
}

// ---- shared memory ---------------------------------------------------------------------------------------

// The storage of one __shared__ declaration (build.py gives each its own Id). Filled with 0xFF at the
// first use in each block: shared memory holds no defined value when a block starts.
// Heap storage of exactly sizeof(T) bytes (never freed), so that an AddressSanitizer build reports an access
// past the end of a shared array.
template <typename T, int Id>
T& shared_var() {
  static unsigned char* const storage =
      static_cast<unsigned char*>(::operator new(sizeof(T), std::align_val_t{alignof(T) > 16 ? alignof(T) : 16}));
  static uint64_t epoch = 0;
  const uint64_t now = block_epoch();
  if (epoch != now) {
    std::memset(storage, 0xFF, sizeof(T));
    epoch = now;
  }
  return *reinterpret_cast<T*>(storage);
}

template <typename T>
uint64_t to_bits(const T& value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace fs_emu

#define FS_EMU_SITE (::std::source_location::current())

#define threadIdx (::fs_emu::place().thread_idx)
#define blockIdx (::fs_emu::place().block_idx)
#define blockDim (::fs_emu::place().block_dim)
#define gridDim (::fs_emu::place().grid_dim)

// ---- synchronisation -------------------------------------------------------------------------------------

inline void __syncthreads(::fs_emu::Site site = FS_EMU_SITE) { ::fs_emu::block_barrier(site); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, ::fs_emu::Site site = FS_EMU_SITE) {
  ::fs_emu::warp_collective(::fs_emu::WarpOp::kSync, mask, 0, 0, warpSize, site);
}
inline void __threadfence() { ::fs_emu::yield_point(); }
inline void __threadfence_block() { ::fs_emu::yield_point(); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize, ::fs_emu::Site site = FS_EMU_SITE) {
  return ::fs_emu::from_bits<T>(::fs_emu::warp_collective(::fs_emu::WarpOp::kShflIdx, mask,
                                                          ::fs_emu::to_bits(value), src_lane, width, site));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize, ::fs_emu::Site site = FS_EMU_SITE) {
  return ::fs_emu::from_bits<T>(::fs_emu::warp_collective(::fs_emu::WarpOp::kShflUp, mask, ::fs_emu::to_bits(value),
                                                          static_cast<int>(delta), width, site));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                   ::fs_emu::Site site = FS_EMU_SITE) {
  return ::fs_emu::from_bits<T>(::fs_emu::warp_collective(::fs_emu::WarpOp::kShflDown, mask,
                                                          ::fs_emu::to_bits(value), static_cast<int>(delta), width,
                                                          site));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize, ::fs_emu::Site site = FS_EMU_SITE) {
  return ::fs_emu::from_bits<T>(::fs_emu::warp_collective(::fs_emu::WarpOp::kShflXor, mask,
                                                          ::fs_emu::to_bits(value), lane_mask, width, site));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, ::fs_emu::Site site = FS_EMU_SITE) {
  return static_cast<unsigned>(
      ::fs_emu::warp_collective(::fs_emu::WarpOp::kBallot, mask, predicate != 0, 0, warpSize, site));
}
inline int __any_sync(unsigned mask, int predicate, ::fs_emu::Site site = FS_EMU_SITE) {
  return static_cast<int>(::fs_emu::warp_collective(::fs_emu::WarpOp::kAny, mask, predicate != 0, 0, warpSize, site));
}
inline int __all_sync(unsigned mask, int predicate, ::fs_emu::Site site = FS_EMU_SITE) {
  return static_cast<int>(::fs_emu::warp_collective(::fs_emu::WarpOp::kAll, mask, predicate != 0, 0, warpSize, site));
}

// ---- atomics: each is a blocking point, so that other threads interleave between atomics --------------------

template <typename T>
T fs_emu_atomic(T* address, T (*update)(T, T), T operand) {
  static_assert(std::is_arithmetic_v<T>, "atomics take an arithmetic type");
  ::fs_emu::yield_point();
  const T old = *address;
  *address = update(old, operand);
  return old;
}

#define FS_EMU_ATOMIC(name, expression)                                                               \
  template <typename T>                                                                             \
  T name(T* address, typename ::fs_emu::detail::Identity<T>::type operand) {                        \
    return fs_emu_atomic<T>(address, [](T old, T value) -> T { return expression; }, operand);      \
  }
FS_EMU_ATOMIC(atomicAdd, static_cast<T>(old + value))
FS_EMU_ATOMIC(atomicSub, static_cast<T>(old - value))
FS_EMU_ATOMIC(atomicExch, value)
FS_EMU_ATOMIC(atomicMin, value < old ? value : old)
FS_EMU_ATOMIC(atomicMax, value > old ? value : old)
FS_EMU_ATOMIC(atomicAnd, static_cast<T>(old & value))
FS_EMU_ATOMIC(atomicOr, static_cast<T>(old | value))
#undef FS_EMU_ATOMIC

template <typename T>
T atomicCAS(T* address, typename ::fs_emu::detail::Identity<T>::type compare,
            typename ::fs_emu::detail::Identity<T>::type value) {
  static_assert(std::is_integral_v<T>, "atomicCAS takes an integer type");
  ::fs_emu::yield_point();
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- loads, bit casts, integer intrinsics ----------------------------------------------------------------

// Cache-hinted loads and stores: plain accesses here.
#define FS_EMU_LOAD(name)            \
  template <typename T>              \
  T name(const T* address) {         \
    return *address;                 \
  }
FS_EMU_LOAD(__ldg)
FS_EMU_LOAD(__ldcg)
FS_EMU_LOAD(__ldca)
FS_EMU_LOAD(__ldcs)
#undef FS_EMU_LOAD
template <typename T>
void __stcg(T* address, T value) {
  *address = value;
}

inline unsigned int __float_as_uint(float value) { return ::fs_emu::from_bits<unsigned int>(::fs_emu::to_bits(value)); }
inline float __uint_as_float(unsigned int value) { return ::fs_emu::from_bits<float>(value); }
inline int __float_as_int(float value) { return ::fs_emu::from_bits<int>(::fs_emu::to_bits(value)); }
inline float __int_as_float(int value) { return ::fs_emu::from_bits<float>(::fs_emu::to_bits(value)); }
inline long long __double_as_longlong(double value) { return ::fs_emu::from_bits<long long>(::fs_emu::to_bits(value)); }
inline double __longlong_as_double(long long value) { return ::fs_emu::from_bits<double>(::fs_emu::to_bits(value)); }
inline int __popc(unsigned int value) { return __builtin_popcount(value); }
inline int __popcll(unsigned long long value) { return __builtin_popcountll(value); }
inline int __clz(unsigned int value) { return value == 0 ? 32 : __builtin_clz(value); }
inline int __clzll(unsigned long long value) { return value == 0 ? 64 : __builtin_clzll(value); }
inline int __ffs(unsigned int value) { return __builtin_ffs(static_cast<int>(value)); }
inline int __ffsll(unsigned long long value) { return __builtin_ffsll(static_cast<long long>(value)); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// ---- the device's min / max overloads and the math the kernels call unqualified -----------------------------

template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  static_assert(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, "min takes arithmetic values");
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  static_assert(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, "max takes arithmetic values");
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// Correctly rounded fp32 arithmetic (the host's IEEE operations are).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __saturatef(float value) { return value != value ? 0.0f : std::min(std::max(value, 0.0f), 1.0f); }

// ---- runtime API -----------------------------------------------------------------------------------------

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, int kind, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

#include "fs_cuda_emu/half.h"
