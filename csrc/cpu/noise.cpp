// CPU kernels of the Philox Gaussian stream (randn_fill_) and of zero-order search neighbours
// (zo_neighbors); formulas in csrc/README.md.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <vector>

#include "common/op_checks.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
namespace {

void randn_fill_(at::Tensor out, int64_t seed, int64_t offset) {
  check_randn_fill_args(out, seed, offset);
  AT_DISPATCH_V2(out.scalar_type(), "randn_fill_", AT_WRAP([&] {
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    NoiseSource<scalar_t> stream;
    stream.seed = static_cast<uint64_t>(seed);
    stream.offset = static_cast<uint64_t>(offset);
    for_each_piece(out.numel(), out.numel(), stream,
                   [&](int64_t, int64_t first, int64_t count, const float* normals) {
                     map_blocks<scalar_t, 1, 0>({out_data + first}, {}, normals, count,
                                                [](const std::array<FloatVec, 0>&, const FloatVec& normal) {
                                                  return std::array<FloatVec, 1>{normal};
                                                });
                   });
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

double sum_lanes(const FloatVec& v) {
  alignas(64) float lanes[FloatVec::size()];
  v.store(lanes);
  double sum = 0.0;
  for (float lane : lanes) sum += lane;
  return sum;
}

// x.x, g.x and g.g over one row of length dim.
struct RowSums {
  double xx = 0.0, gx = 0.0, gg = 0.0;
};

// Draws the row's Gaussians g (stream normals first_normal ...) into `gaussians` and sums x.x, g.x, g.g,
// a chunk at a time: fp32 vector sums while the chunk is in L1, accumulated across chunks in double.
template <typename scalar_t>
RowSums draw_row_and_sum(const scalar_t* x, int64_t dim, uint64_t seed, uint64_t first_normal, float* gaussians) {
  RowSums sums;
  for (int64_t first = 0; first < dim; first += kChunk) {
    const int64_t count = std::min(kChunk, dim - first);
    float* g = gaussians + first;
    fill_normals(seed, first_normal + static_cast<uint64_t>(first), count, g);
    FloatVec xx(0.0f), gx(0.0f), gg(0.0f);
    for (int64_t start = 0; start < count; start += kBlock) {
      const int64_t size = std::min(kBlock, count - start);
      const auto [x_low, x_high] = load_block(x + first + start, size);
      const auto [g_low, g_high] = load_block(g + start, size);
      xx = at::vec::fmadd(x_low, x_low, at::vec::fmadd(x_high, x_high, xx));
      gx = at::vec::fmadd(g_low, x_low, at::vec::fmadd(g_high, x_high, gx));
      gg = at::vec::fmadd(g_low, g_low, at::vec::fmadd(g_high, g_high, gg));
    }
    sums.xx += sum_lanes(xx);
    sums.gx += sum_lanes(gx);
    sums.gg += sum_lanes(gg);
  }
  return sums;
}

at::Tensor zo_neighbors(const at::Tensor& pivot, int64_t num_neighbors, double cos_sim, int64_t seed) {
  check_zo_neighbors_args(pivot, num_neighbors, cos_sim, seed);
  const c10::MaybeOwned<at::Tensor> x = pivot.expect_contiguous();
  const int64_t batch = x->size(0);
  const int64_t dim = batch == 0 ? 0 : x->numel() / batch;
  std::vector<int64_t> out_sizes{batch, num_neighbors};
  out_sizes.insert(out_sizes.end(), x->sizes().begin() + 1, x->sizes().end());
  at::Tensor out = at::detail::empty_cpu(out_sizes, x->scalar_type());
  const int64_t rows = batch * num_neighbors;
  if (rows == 0 || dim == 0) return out;
  const double orthogonal_share = std::sqrt(std::max(1.0 - cos_sim * cos_sim, 0.0));

  AT_DISPATCH_V2(x->scalar_type(), "zo_neighbors", AT_WRAP([&] {
    const scalar_t* x_data = x->const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kDrawingGrainElements / dim);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      // The row's Gaussians, kept between the sums and the write (drawing them is the costly part).
      const std::unique_ptr<float[]> gaussians(new float[dim]);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* row_pivot = x_data + (row / num_neighbors) * dim;
        const RowSums sums = draw_row_and_sum(row_pivot, dim, static_cast<uint64_t>(seed),
                                              static_cast<uint64_t>(row * dim), gaussians.get());
        // out = alpha x + beta g: |x| (c u + sqrt(1 - c^2) w) with w the unit part of g orthogonal to u.
        double alpha = 0.0, beta = 0.0;  // a zero pivot has zero neighbours
        if (sums.xx != 0.0) {  // NaN in the pivot: the formula, so NaN everywhere
          const double orthogonal_norm = std::sqrt(std::max(sums.gg - sums.gx * sums.gx / sums.xx, 1e-30));
          beta = orthogonal_share * std::sqrt(sums.xx) / orthogonal_norm;
          alpha = cos_sim - beta * sums.gx / sums.xx;
        }
        const FloatVec x_weight(static_cast<float>(alpha)), g_weight(static_cast<float>(beta));
        map_blocks<scalar_t, 1, 1>({out_data + row * dim}, {row_pivot}, gaussians.get(), dim,
                                   [&](const std::array<FloatVec, 1>& in, const FloatVec& g) {
                                     return std::array<FloatVec, 1>{at::vec::fmadd(in[0], x_weight, g * g_weight)};
                                   });
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("randn_fill_", &fastsearch::cpu::randn_fill_);
  m.impl("zo_neighbors", &fastsearch::cpu::zo_neighbors);
}
