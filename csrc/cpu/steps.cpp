// CPU kernels of the sampler steps (DDIM, flow-matching Euler / Heun, re-noising); formulas in
// csrc/README.md. Each step is one pass: per-sample coefficients in fp32, then an affine combination of
// the inputs (and the noise) per element, with the noise drawn in-kernel when given a seed.
//
// Every op has an allocating form and a `.out` form that writes into the caller's tensors (both in
// common/step_entries.h); both run the writer here. An output may be an input itself (common/out_checks.h): map_blocks loads a block of every
// input before it stores that block of the outputs, and each block belongs to one thread.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "common/out_checks.h"
#include "common/step_entries.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
namespace {

// Borrowed views skip the dispatcher where the inputs are already contiguous (the usual case), and
// outputs come from the CPU allocator directly: on small tensors these calls are most of the cost.
using Contiguous = c10::MaybeOwned<at::Tensor>;

Contiguous contiguous_noise(const std::optional<at::Tensor>& noise, bool draws) {
  return draws && noise.has_value() ? noise->expect_contiguous() : Contiguous::owned(std::in_place);
}

at::Tensor empty_output(const at::Tensor& like) { return at::detail::empty_cpu(like.sizes(), like.scalar_type()); }

// Sample b owns the flat elements [b N, (b + 1) N).
int64_t elements_per_sample(const at::Tensor& sample) {
  return sample.numel() == 0 ? 1 : sample.numel() / sample.size(0);
}

// `noise` is contiguous or undefined; draws == false means the step takes no noise at all.
template <typename scalar_t>
NoiseSource<scalar_t> noise_source(const at::Tensor& noise, std::optional<int64_t> seed, bool draws) {
  NoiseSource<scalar_t> source;
  if (!draws) return source;
  if (noise.defined()) {
    source.tensor = noise.const_data_ptr<scalar_t>();
  } else {
    source.seed = static_cast<uint64_t>(*seed);
  }
  return source;
}

// Every step evaluates the reference's expression (fastsearch/ops/steps.py), operation for operation and
// in the same order, without fused multiply-adds: NaN and inf then come out where the reference's do
// (0 * inf is NaN, so no term the reference leaves out is computed as "0 times" something here).

// max(value, low) that keeps a NaN value NaN, as torch.clamp(min=low) does.
inline float max_keep_nan(float value, float low) { return value < low ? low : value; }

// clamp(value, low, high) that keeps NaN NaN, as torch.clamp does (at::vec::clamp loses NaN in the default
// build; at::vec::maximum / minimum propagate it in every build).
inline FloatVec clamp_keep_nan(const FloatVec& value, const FloatVec& low, const FloatVec& high) {
  return at::vec::minimum(at::vec::maximum(value, low), high);
}

// DDIM's per-sample scalars, as the reference computes them in fp32.
struct DdimCoefficients {
  float sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction, std_dev;
};

DdimCoefficients ddim_coefficients(float alpha, float alpha_prev, float eta) {
  const float beta = 1.0f - alpha;
  // eta 0 still multiplies the square root: alpha_prev < alpha gives NaN, as in the reference and diffusers.
  const float std_dev = eta * std::sqrt(((1.0f - alpha_prev) / beta) * (1.0f - alpha / alpha_prev));
  return {std::sqrt(alpha), std::sqrt(beta), std::sqrt(alpha_prev),
          std::sqrt(max_keep_nan(1.0f - alpha_prev - std_dev * std_dev, 0.0f)), std_dev};
}

// Writes DDIM into prev and x0 (contiguous, like sample); the arguments are checked.
void ddim_step_into(const at::Tensor& sample, const at::Tensor& model_output,
                    const std::optional<at::Tensor>& alpha_prod_t, double alpha_prod_t_value,
                    const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value, double eta,
                    const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
                    std::optional<double> clip_sample_range, bool use_clipped_model_output, at::Tensor& prev,
                    at::Tensor& x0) {
  const Contiguous x = sample.expect_contiguous();
  const Contiguous m = model_output.expect_contiguous();
  const bool draws = eta > 0;
  const Contiguous z = contiguous_noise(noise, draws);
  at::Tensor alpha_values, alpha_prev_values;
  const ScheduleValue alpha = schedule_value(alpha_prod_t, alpha_prod_t_value, alpha_values);
  const ScheduleValue alpha_prev = schedule_value(alpha_prod_t_prev, alpha_prod_t_prev_value, alpha_prev_values);
  const bool clip = clip_sample_range.has_value();
  const float clip_bound = clip ? static_cast<float>(*clip_sample_range) : std::numeric_limits<float>::infinity();
  const bool eps_from_clipped_x0 = clip && use_clipped_model_output;

  AT_DISPATCH_V2(x->scalar_type(), "ddim_step", AT_WRAP([&] {
    const scalar_t* x_data = x->const_data_ptr<scalar_t>();
    const scalar_t* m_data = m->const_data_ptr<scalar_t>();
    scalar_t* prev_data = prev.mutable_data_ptr<scalar_t>();
    scalar_t* x0_data = x0.mutable_data_ptr<scalar_t>();
    const FloatVec low(-clip_bound), high(clip_bound);
    for_each_piece(x->numel(), elements_per_sample(*x), noise_source<scalar_t>(*z, seed, draws),
                   [&](int64_t sample_index, int64_t first, int64_t count, const float* piece_noise) {
      const DdimCoefficients c =
          ddim_coefficients(alpha.at(sample_index), alpha_prev.at(sample_index), static_cast<float>(eta));
      const FloatVec sqrt_alpha(c.sqrt_alpha), sqrt_beta(c.sqrt_beta), sqrt_alpha_prev(c.sqrt_alpha_prev);
      const FloatVec direction(c.direction), std_dev(c.std_dev);
      map_blocks<scalar_t, 2, 2>(
          {prev_data + first, x0_data + first}, {x_data + first, m_data + first}, piece_noise, count,
          [&](const std::array<FloatVec, 2>& in, const FloatVec& noise_value) {
            const FloatVec& xv = in[0];
            const FloatVec& mv = in[1];
            FloatVec pred_x0, eps;
            if (prediction_type == 0) {  // epsilon
              pred_x0 = (xv - sqrt_beta * mv) / sqrt_alpha;
              eps = mv;
            } else if (prediction_type == 1) {  // sample
              pred_x0 = mv;
              eps = (xv - sqrt_alpha * pred_x0) / sqrt_beta;
            } else {  // v_prediction
              pred_x0 = sqrt_alpha * xv - sqrt_beta * mv;
              eps = sqrt_alpha * mv + sqrt_beta * xv;
            }
            if (clip) {
              pred_x0 = clamp_keep_nan(pred_x0, low, high);
              if (eps_from_clipped_x0) eps = (xv - sqrt_alpha * pred_x0) / sqrt_beta;
            }
            FloatVec prev_value = sqrt_alpha_prev * pred_x0 + direction * eps;
            if (draws) prev_value = prev_value + std_dev * noise_value;
            return std::array<FloatVec, 2>{prev_value, pred_x0};
          });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

// out[i] = math(per-sample coefficients, inputs[..][i], noise[i]) for a step with one output: inputs[0] is the
// sample; `noise` is contiguous or undefined; `out` is contiguous, like the sample. coefficients(sample_index)
// returns the sample's scalars; math(coefficients as FloatVecs, inputs, noise) the element's value.
template <size_t kInputs, size_t kCoefficients, typename Coefficients, typename Math>
void map_step(const std::array<const at::Tensor*, kInputs>& inputs, const at::Tensor& noise,
              std::optional<int64_t> seed, bool draws, const Coefficients& coefficients, const Math& math,
              at::Tensor& out) {
  const at::Tensor& x = *inputs[0];
  AT_DISPATCH_V2(x.scalar_type(), "map_step", AT_WRAP([&] {
    std::array<const scalar_t*, kInputs> input_data;
    for (size_t k = 0; k < kInputs; ++k) input_data[k] = inputs[k]->template const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    for_each_piece(x.numel(), elements_per_sample(x), noise_source<scalar_t>(noise, seed, draws),
                   [&](int64_t sample_index, int64_t first, int64_t count, const float* piece_noise) {
      const std::array<float, kCoefficients> scalars = coefficients(sample_index);
      std::array<FloatVec, kCoefficients> c;
      for (size_t k = 0; k < kCoefficients; ++k) c[k] = FloatVec(scalars[k]);
      std::array<const scalar_t*, kInputs> piece_inputs;
      for (size_t k = 0; k < kInputs; ++k) piece_inputs[k] = input_data[k] + first;
      map_blocks<scalar_t, 1, kInputs>({out_data + first}, piece_inputs, piece_noise, count,
                                       [&](const std::array<FloatVec, kInputs>& in, const FloatVec& noise_value) {
                                         return std::array<FloatVec, 1>{math(c, in, noise_value)};
                                       });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

void flow_euler_step_into(const at::Tensor& sample, const at::Tensor& velocity,
                          const std::optional<at::Tensor>& sigma, double sigma_value,
                          const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                          const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, bool stochastic,
                          at::Tensor& out) {
  const Contiguous x = sample.expect_contiguous();
  const Contiguous v = velocity.expect_contiguous();
  const Contiguous z = contiguous_noise(noise, stochastic);
  at::Tensor sigma_values, sigma_next_values;
  const ScheduleValue level = schedule_value(sigma, sigma_value, sigma_values);
  const ScheduleValue level_next = schedule_value(sigma_next, sigma_next_value, sigma_next_values);
  const auto coefficients = [&](int64_t sample_index) {
    return std::array<float, 2>{level.at(sample_index), level_next.at(sample_index)};
  };
  if (stochastic) {  // (1 - s') (x - s v) + s' z
    map_step<2, 2>({&*x, &*v}, *z, seed, true, coefficients,
                   [](const std::array<FloatVec, 2>& c, const std::array<FloatVec, 2>& in, const FloatVec& noise_value) {
                     return (FloatVec(1.0f) - c[1]) * (in[0] - c[0] * in[1]) + c[1] * noise_value;
                   }, out);
  } else {  // x + (s' - s) v
    map_step<2, 1>({&*x, &*v}, *z, seed, false,
                   [&](int64_t sample_index) {
                     return std::array<float, 1>{level_next.at(sample_index) - level.at(sample_index)};
                   },
                   [](const std::array<FloatVec, 1>& c, const std::array<FloatVec, 2>& in, const FloatVec&) {
                     return in[0] + c[0] * in[1];
                   }, out);
  }
}

void flow_heun_step_into(const at::Tensor& sample, const at::Tensor& velocity, const at::Tensor& velocity_next,
                         const std::optional<at::Tensor>& sigma, double sigma_value,
                         const std::optional<at::Tensor>& sigma_next, double sigma_next_value, at::Tensor& out) {
  const Contiguous x = sample.expect_contiguous();
  const Contiguous v = velocity.expect_contiguous();
  const Contiguous v_next = velocity_next.expect_contiguous();
  at::Tensor sigma_values, sigma_next_values;
  const ScheduleValue level = schedule_value(sigma, sigma_value, sigma_values);
  const ScheduleValue level_next = schedule_value(sigma_next, sigma_next_value, sigma_next_values);
  map_step<3, 1>({&*x, &*v, &*v_next}, at::Tensor(), std::nullopt, false,
                 [&](int64_t sample_index) {  // (s' - s) / 2
                   return std::array<float, 1>{(level_next.at(sample_index) - level.at(sample_index)) * 0.5f};
                 },
                 [](const std::array<FloatVec, 1>& c, const std::array<FloatVec, 3>& in, const FloatVec&) {
                   return in[0] + c[0] * (in[1] + in[2]);  // x + h (v1 + v2)
                 }, out);
}

// The re-noising scale of the sample and of the noise. The noise variance is written as a product of
// differences, so that it is exactly 0 for equal levels and suffers no cancellation for nearby ones:
//   vp:   1 - to / from = (from - to) / from
//   flow: to^2 - scale^2 from^2 = (to - scale from)(to + scale from), to - scale from = (to - from) / (1 - from).
std::array<float, 2> renoise_coefficients(int64_t schedule, float from, float to) {
  float scale, variance;
  if (schedule == 0) {  // vp: levels are alpha_prod
    scale = std::sqrt(to / from);
    variance = (from - to) / from;
  } else {  // flow: levels are sigmas
    scale = (1.0f - to) / (1.0f - from);
    variance = ((to - from) / (1.0f - from)) * (to + scale * from);
  }
  return {scale, std::sqrt(max_keep_nan(variance, 0.0f))};
}

void renoise_into(const at::Tensor& sample, const std::optional<at::Tensor>& level_from, double level_from_value,
                  const std::optional<at::Tensor>& level_to, double level_to_value, int64_t schedule,
                  const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, at::Tensor& out) {
  const Contiguous x = sample.expect_contiguous();
  const Contiguous z = contiguous_noise(noise, true);
  at::Tensor level_from_values, level_to_values;
  const ScheduleValue start = schedule_value(level_from, level_from_value, level_from_values);
  const ScheduleValue end = schedule_value(level_to, level_to_value, level_to_values);
  map_step<1, 2>({&*x}, *z, seed, true,
                 [&](int64_t sample_index) {
                   return renoise_coefficients(schedule, start.at(sample_index), end.at(sample_index));
                 },
                 [](const std::array<FloatVec, 2>& c, const std::array<FloatVec, 1>& in, const FloatVec& noise_value) {
                   const FloatVec kept = c[0] * in[0];
                   // No noise term where its scale is 0: equal levels return the sample bit for bit.
                   return FloatVec::blendv(kept + c[1] * noise_value, kept, c[1] == FloatVec(0.0f));
                 }, out);
}

// The CPU writers of the step entry points (common/step_entries.h).
struct Writers {
  static at::Tensor empty_like(const at::Tensor& sample) { return empty_output(sample); }
  static constexpr auto ddim_step = &ddim_step_into;
  static constexpr auto flow_euler_step = &flow_euler_step_into;
  static constexpr auto flow_heun_step = &flow_heun_step_into;
  static constexpr auto renoise = &renoise_into;
};

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) { fastsearch::StepEntries<fastsearch::cpu::Writers>::register_all(m); }
