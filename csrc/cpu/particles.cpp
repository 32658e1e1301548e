// CPU kernels of the particle ops: resampling and effective sample size. Semantics: csrc/README.md
// ("Selection ops"); oracle: fastsearch/ops/particles.py.
//
// Weights are fp32 as in the reference (exp within an ulp of the exact value, as torch's is), and sums run
// in fp64, rounded once to fp32 (torch's cumsum does the same). Every capability build gives the same bits:
// exp is exact_exp.h's, the uniforms are Philox words (vec_stream.h), and the rest is scalar.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "common/select_checks.h"
#include "cpu/exact_exp.h"
#include "cpu/groups.h"
#include "cpu/tensor_args.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
namespace {

constexpr float kInfinity = std::numeric_limits<float>::infinity();

// -- weights ---------------------------------------------------------------------------------------------

struct WeightScratch {
  std::vector<float> weights;
  std::vector<float> cdf;
  std::vector<float> uniforms;
};

// w = exp(lw - max) of one group into w[0, size), in fp32 as the reference computes it; returns the
// max, NaN when a log-weight is NaN (w then unset). A max of -inf (empty or all -inf) leaves zeros.
float group_weights(at::ScalarType dtype, const void* log_weights, int64_t begin, int64_t size, float* w) {
  to_float(dtype, log_weights, begin, size, w);
  float top = -kInfinity;
  for (int64_t i = 0; i < size; ++i) {
    if (std::isnan(w[i])) return w[i];
    top = std::max(top, w[i]);
  }
  const FloatVec shift(std::isfinite(top) ? top : 0.0f);
  for (int64_t start = 0; start < size; start += FloatVec::size()) {
    const int64_t lanes = std::min<int64_t>(FloatVec::size(), size - start);
    exp_same_in_every_build(FloatVec::loadu(w + start, lanes) - shift).store(w + start, lanes);
  }
  return top;
}

// Sum of values[0, size) in fp64, rounded once to fp32.
float sum_to_float(const float* values, int64_t size) {
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) sum += values[i];
  return static_cast<float>(sum);
}

// -- resample --------------------------------------------------------------------------------------------

// Uniforms u_first ... u_(first + count - 1) of the Philox stream into out: u_j is word j % 4 of the
// block of counter j / 4, drawn kCounterLanes blocks at a time by vec_stream.h's vectorised Philox.
void fill_uniforms(uint64_t seed, uint64_t first, int64_t count, float* out) {
  alignas(64) float units[4][kCounterLanes];
  const uint64_t end = first + static_cast<uint64_t>(count);
  for (uint64_t counter = first / 4; 4 * counter < end; counter += kCounterLanes) {
    philox_units(seed, counter, units);
    for (int64_t lane = 0; lane < kCounterLanes; ++lane) {
      for (uint64_t word = 0; word < 4; ++word) {
        const uint64_t position = 4 * (counter + static_cast<uint64_t>(lane)) + word;
        if (position >= first && position < end) out[position - first] = units[word][lane];
      }
    }
  }
}

// The CDF of `mass` in cdf[0, size): fp64 running sums rounded per entry (as torch's CPU cumsum), exactly
// 1 from the last entry with mass > 0 on, so no position below 1 lands past it. Returns that entry, or
// -1 when there is none.
int64_t build_cdf(const float* mass, int64_t size, float* cdf) {
  int64_t last = -1;
  for (int64_t i = 0; i < size; ++i) {
    if (mass[i] > 0.0f) last = i;
  }
  double running = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    running += mass[i];
    cdf[i] = i >= last ? 1.0f : static_cast<float>(running);
  }
  return last;
}

// The first candidate whose CDF value is above `position`; a position at or past the end (1.0 after
// rounding) takes the last candidate with mass.
int64_t draw(const float* cdf, int64_t size, int64_t last, float position) {
  const int64_t above = std::upper_bound(cdf, cdf + size, position) - cdf;
  return std::min(above, std::max<int64_t>(last, 0));
}

// Lowers `slot` to `value` if that is smaller (the lowest failing group is the one reported).
void lower_to(std::atomic<int64_t>& slot, int64_t value) {
  int64_t held = slot.load();
  while (value < held && !slot.compare_exchange_weak(held, value)) {
  }
}

at::Tensor resample(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets, int64_t num_samples,
                    int64_t method, int64_t seed) {
  check_resample_args(log_weights, offsets, num_samples, method);
  const Contiguous x = log_weights.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor ancestors = empty_output({groups.count, num_samples}, at::kLong);
  const at::ScalarType dtype = x->scalar_type();
  const void* data = x->const_data_ptr();
  int64_t* ancestors_out = ancestors.mutable_data_ptr<int64_t>();
  const float samples = static_cast<float>(num_samples);
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_nan_group{kNone};
  std::atomic<int64_t> first_dead_group{kNone};

  // A candidate costs its weight and CDF entry, a sample its uniform and binary search.
  const GroupCost cost{4.0, 16.0 * static_cast<double>(num_samples)};
  for_each_group(groups, cost, [&](int64_t group, int64_t begin, int64_t size) {
    WeightScratch& s = thread_scratch<WeightScratch>();
    float* w = room_for(s.weights, size);
    const float top = group_weights(dtype, data, begin, size, w);
    // NaN or +inf: not a weight; -inf: empty or all -inf. Both are errors, reported after the loop.
    if (!std::isfinite(top)) {
      lower_to(top == -kInfinity ? first_dead_group : first_nan_group, group);
      return;
    }
    const float total = sum_to_float(w, size);
    for (int64_t i = 0; i < size; ++i) w[i] /= total;
    float* cdf = room_for(s.cdf, size);
    float* uniforms = room_for(s.uniforms, num_samples);
    int64_t* out = ancestors_out + group * num_samples;
    const uint64_t first_position = static_cast<uint64_t>(group) * static_cast<uint64_t>(num_samples);

    if (method == 3) {  // residual: floor(N w) copies in index order, then multinomial on what is left
      int64_t filled = 0;
      for (int64_t i = 0; i < size; ++i) {
        const float expected = w[i] * samples;
        const float copies = std::floor(expected);
        for (int64_t c = 0; c < static_cast<int64_t>(copies) && filled < num_samples; ++c) out[filled++] = begin + i;
        w[i] = expected - copies;
      }
      const int64_t remainder = num_samples - filled;
      if (remainder == 0) return;
      const float residual_total = std::max(sum_to_float(w, size), 1e-30f);
      for (int64_t i = 0; i < size; ++i) w[i] /= residual_total;
      const int64_t last = build_cdf(w, size, cdf);
      fill_uniforms(static_cast<uint64_t>(seed), first_position, remainder, uniforms);
      for (int64_t i = 0; i < remainder; ++i) out[filled + i] = begin + draw(cdf, size, last, uniforms[i]);
      return;
    }
    const int64_t last = build_cdf(w, size, cdf);
    // Systematic draws take only u_0; the others one uniform per sample.
    fill_uniforms(static_cast<uint64_t>(seed), first_position, method == 1 ? 1 : num_samples, uniforms);
    for (int64_t i = 0; i < num_samples; ++i) {
      // fp32 (u + i) / N, as the reference computes it
      const float position = method == 0   ? uniforms[i]
                             : method == 1 ? (uniforms[0] + static_cast<float>(i)) / samples
                                           : (uniforms[i] + static_cast<float>(i)) / samples;
      out[i] = begin + draw(cdf, size, last, position);
    }
  });
  const int64_t nan_group = first_nan_group.load();
  const int64_t dead_group = first_dead_group.load();
  report_resample_errors(nan_group == kNone ? -1 : nan_group, dead_group == kNone ? -1 : dead_group);
  return ancestors;
}

// -- effective_sample_size -------------------------------------------------------------------------------

at::Tensor effective_sample_size(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets) {
  check_effective_sample_size_args(log_weights, offsets);
  const Contiguous x = log_weights.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor ess = empty_output({groups.count}, at::kFloat);
  const at::ScalarType dtype = x->scalar_type();
  const void* data = x->const_data_ptr();
  float* ess_out = ess.mutable_data_ptr<float>();

  for_each_group(groups, {2.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
    float* w = room_for(thread_scratch<WeightScratch>().weights, size);
    const float top = group_weights(dtype, data, begin, size, w);
    // No finite maximum: NaN for a group holding a NaN or +inf (not a weight), 0 for an empty or all
    // -inf group, as the reference reports.
    if (!std::isfinite(top)) {
      ess_out[group] = top == -kInfinity ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      return;
    }
    double sum = 0.0;
    double squares = 0.0;
    for (int64_t i = 0; i < size; ++i) {
      sum += w[i];
      squares += w[i] * w[i];  // each square rounded to fp32 first, as the reference's w * w
    }
    const float total = static_cast<float>(sum);
    ess_out[group] = total * total / static_cast<float>(squares);
  });
  return ess;
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("resample", &fastsearch::cpu::resample);
  m.impl("effective_sample_size", &fastsearch::cpu::effective_sample_size);
}
