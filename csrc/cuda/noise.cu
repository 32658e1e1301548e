// CUDA kernels of the Gaussian stream: randn_fill_ and zero-order search neighbours. Formulas:
// csrc/README.md; the stream: common/philox.h.
//
// Every thread works on whole Philox blocks (four consecutive stream normals, one counter) and keeps
// all four normals, clipping at the ends of its range. These kernels are bound by the Philox and
// Box-Muller arithmetic rather than by memory.
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>

#include "cuda/device_common.cuh"

namespace fastsearch::gpu {
namespace {

constexpr int kThreads = 256;

// Writes values[j] to dst[first + j] for the j with lo <= first + j < hi: one packed store when all four
// are in range and aligned, else element by element.
template <typename T>
__device__ __forceinline__ void store_quad(T* __restrict__ dst, int64_t first, int64_t lo, int64_t hi,
                                           const float (&values)[4]) {
  using Quad = Pack<T, 4>;
  if (first >= lo && first + 4 <= hi && is_aligned_for<Quad>(dst + first)) {
    Quad quad;
#pragma unroll
    for (int j = 0; j < 4; ++j) quad.values[j] = from_float<T>(values[j]);
    *reinterpret_cast<Quad*>(dst + first) = quad;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (first + j >= lo && first + j < hi) dst[first + j] = from_float<T>(values[j]);
  }
}

// One thread per Philox block; normal z_s goes to out[s - offset].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    randn_fill_kernel(T* __restrict__ out, int64_t numel, uint64_t seed, uint64_t offset) {
  const uint64_t counter = offset / 4 + static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  // Negative for the first block when offset is not a multiple of 4.
  const int64_t first = static_cast<int64_t>(4 * counter - offset);
  if (first >= numel) return;
  float normals[4];
  stream_normals(seed, counter, normals);
  store_quad(out, first, 0, numel, normals);
}

// -- zo_neighbors ----------------------------------------------------------------------------------------
//
// Row r = b K + k of the output is neighbour k of pivot b; its Gaussian is stream normals [r D, (r + 1) D).
// The row's sums x.x, g.x, g.g are split over chunks of the row, one block each (grid rows x chunks):
// zo_partial_sums_kernel writes one partial per (row, chunk) to the workspace; zo_write_kernel adds a
// row's partials in a fixed order (so the sums are deterministic and every block of a row gets the same
// alpha and beta), then regenerates its chunk's normals and writes alpha x + beta g. Regenerating the
// normals costs less than a round trip of them through memory.

// A block covers kThreads threads x kQuadsPerThread Philox blocks.
constexpr int kQuadsPerThread = 4;
constexpr int64_t kMinChunk = 4 * kThreads * kQuadsPerThread;
constexpr int64_t kMaxChunksPerRow = 65535;  // gridDim.y

struct RowSums {
  float xx;
  float gx;
  float gg;
};

struct AddRowSums {
  __device__ RowSums operator()(const RowSums& a, const RowSums& b) const {
    return RowSums{a.xx + b.xx, a.gx + b.gx, a.gg + b.gg};
  }
};

using BlockReduceRowSums = cub::BlockReduce<RowSums, kThreads>;

// Elements per chunk: a multiple of 4 (chunks of a row with D % 4 == 0 then share no Philox block),
// larger than kMinChunk only where a row would otherwise need more than kMaxChunksPerRow chunks.
int64_t zo_chunk_size(int64_t dim) {
  const int64_t spread = (dim + kMaxChunksPerRow - 1) / kMaxChunksPerRow;
  return std::max(kMinChunk, (spread + 3) / 4 * 4);
}

// The stream range [lo, hi) of the block's chunk, inside row blockIdx.x which starts at row_begin.
struct Chunk {
  int64_t row_begin;
  int64_t lo;
  int64_t hi;
};

__device__ __forceinline__ Chunk block_chunk(int64_t dim, int64_t chunk_size) {
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * dim;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk_size;
  const int64_t end = start + chunk_size < dim ? start + chunk_size : dim;
  return Chunk{row_begin, row_begin + start, row_begin + end};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    zo_partial_sums_kernel(const T* __restrict__ pivot, int64_t num_neighbors, int64_t dim, int64_t chunk_size,
                           uint64_t seed, RowSums* __restrict__ partials) {
  const Chunk chunk = block_chunk(dim, chunk_size);
  const T* x = pivot + (static_cast<int64_t>(blockIdx.x) / num_neighbors) * dim;
  RowSums sums{0.0f, 0.0f, 0.0f};
  for (int64_t counter = chunk.lo / 4 + threadIdx.x; 4 * counter < chunk.hi; counter += kThreads) {
    float normals[4];
    stream_normals(seed, static_cast<uint64_t>(counter), normals);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t e = 4 * counter + lane;
      if (e >= chunk.lo && e < chunk.hi) {
        const float pivot_value = to_float(x[e - chunk.row_begin]);
        sums.xx += pivot_value * pivot_value;
        sums.gx += normals[lane] * pivot_value;
        sums.gg += normals[lane] * normals[lane];
      }
    }
  }
  __shared__ typename BlockReduceRowSums::TempStorage reduce_storage;
  const RowSums total = BlockReduceRowSums(reduce_storage).Reduce(sums, AddRowSums{});
  if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    zo_write_kernel(const T* __restrict__ pivot, int64_t num_neighbors, int64_t dim, int64_t chunk_size,
                    float cos_sim, float sin_sim, uint64_t seed, const RowSums* __restrict__ partials,
                    T* __restrict__ out) {
  const RowSums* row_partials = partials + static_cast<int64_t>(blockIdx.x) * gridDim.y;
  RowSums sums{0.0f, 0.0f, 0.0f};
  for (unsigned int chunk = threadIdx.x; chunk < gridDim.y; chunk += kThreads) {
    sums = AddRowSums{}(sums, row_partials[chunk]);
  }
  __shared__ typename BlockReduceRowSums::TempStorage reduce_storage;
  const RowSums total = BlockReduceRowSums(reduce_storage).Reduce(sums, AddRowSums{});

  // out = alpha x + beta g; a zero (or NaN) pivot has zero neighbours.
  __shared__ float alpha_beta[2];
  __shared__ bool zero_pivot;
  if (threadIdx.x == 0) {
    zero_pivot = total.xx == 0.0f;  // NaN in the pivot goes through the formula: NaN everywhere
    if (!zero_pivot) {
      const float orth_norm = sqrtf(clamp_min(total.gg - total.gx * total.gx / total.xx, 1e-30f));
      const float beta = sin_sim * sqrtf(total.xx) / orth_norm;
      alpha_beta[0] = cos_sim - beta * total.gx / total.xx;
      alpha_beta[1] = beta;
    }
  }
  __syncthreads();

  const Chunk chunk = block_chunk(dim, chunk_size);
  const T* x = pivot + (static_cast<int64_t>(blockIdx.x) / num_neighbors) * dim;
  for (int64_t counter = chunk.lo / 4 + threadIdx.x; 4 * counter < chunk.hi; counter += kThreads) {
    float values[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (!zero_pivot) {
      stream_normals(seed, static_cast<uint64_t>(counter), values);
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t e = 4 * counter + lane;
        if (e >= chunk.lo && e < chunk.hi) {
          values[lane] = alpha_beta[0] * to_float(x[e - chunk.row_begin]) + alpha_beta[1] * values[lane];
        }
      }
    }
    store_quad(out, 4 * counter, chunk.lo, chunk.hi, values);
  }
}

}  // namespace

void launch_randn_fill(DType dtype, void* out, int64_t numel, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (numel == 0) return;
  const int64_t counters = static_cast<int64_t>((offset + numel + 3) / 4 - offset / 4);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    randn_fill_kernel<T><<<blocks_for(counters, kThreads), kThreads, 0, stream>>>(static_cast<T*>(out), numel, seed,
                                                                                   offset);
  });
}

int64_t zo_neighbors_workspace_floats(int64_t rows, int64_t dim) {
  if (rows == 0 || dim == 0) return 0;
  const int64_t chunk_size = zo_chunk_size(dim);
  const int64_t chunks = (dim + chunk_size - 1) / chunk_size;
  return rows * chunks * static_cast<int64_t>(sizeof(RowSums) / sizeof(float));
}

void launch_zo_neighbors(DType dtype, const void* pivot, int64_t batch, int64_t num_neighbors, int64_t dim,
                         double cos_sim, uint64_t seed, float* workspace, void* out, cudaStream_t stream) {
  const int64_t rows = batch * num_neighbors;
  if (rows == 0 || dim == 0) return;
  const int64_t chunk_size = zo_chunk_size(dim);
  const dim3 grid(static_cast<unsigned int>(rows), static_cast<unsigned int>((dim + chunk_size - 1) / chunk_size));
  // sqrt(1 - c^2) in double, as the reference computes it.
  const float sin_sim = static_cast<float>(std::sqrt(std::max(1.0 - cos_sim * cos_sim, 0.0)));
  auto* partials = reinterpret_cast<RowSums*>(workspace);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* typed_pivot = static_cast<const T*>(pivot);
    zo_partial_sums_kernel<T><<<grid, kThreads, 0, stream>>>(typed_pivot, num_neighbors, dim, chunk_size, seed,
                                                             partials);
    zo_write_kernel<T><<<grid, kThreads, 0, stream>>>(typed_pivot, num_neighbors, dim, chunk_size,
                                                      static_cast<float>(cos_sim), sin_sim, seed, partials,
                                                      static_cast<T*>(out));
  });
}

}  // namespace fastsearch::gpu
