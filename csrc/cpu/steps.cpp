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

using at::vec::fmadd;

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

// DDIM for one sample as affine maps of x = sample, m = model_output and the noise z:
//   x0 = clamp(x0_x x + x0_m m), eps = eps_x x + eps_m m + eps_x0 x0, prev = prev_x0 x0 + prev_eps eps + prev_z z.
struct DdimCoefficients {
  float x0_x, x0_m, eps_x, eps_m, eps_x0, prev_x0, prev_eps, prev_z;
};

DdimCoefficients ddim_coefficients(float alpha, float alpha_prev, float eta, int64_t prediction_type,
                                   bool eps_from_clipped_x0) {
  const float beta = 1.0f - alpha;
  const float sqrt_alpha = std::sqrt(alpha);
  const float sqrt_beta = std::sqrt(beta);
  DdimCoefficients c{};
  if (prediction_type == 0) {  // epsilon
    c = {1.0f / sqrt_alpha, -sqrt_beta / sqrt_alpha, 0.0f, 1.0f, 0.0f};
  } else if (prediction_type == 1) {  // sample
    c = {0.0f, 1.0f, 1.0f / sqrt_beta, -sqrt_alpha / sqrt_beta, 0.0f};
  } else {  // v_prediction
    c = {sqrt_alpha, -sqrt_beta, sqrt_beta, sqrt_alpha, 0.0f};
  }
  if (eps_from_clipped_x0) {
    c.eps_x = 1.0f / sqrt_beta;
    c.eps_m = 0.0f;
    c.eps_x0 = -sqrt_alpha / sqrt_beta;
  }
  const float std_dev = eta * std::sqrt(((1.0f - alpha_prev) / beta) * (1.0f - alpha / alpha_prev));
  c.prev_x0 = std::sqrt(alpha_prev);
  c.prev_eps = std::sqrt(std::max(1.0f - alpha_prev - std_dev * std_dev, 0.0f));
  c.prev_z = std_dev;
  return c;
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
      const DdimCoefficients c = ddim_coefficients(alpha.at(sample_index), alpha_prev.at(sample_index),
                                                   static_cast<float>(eta), prediction_type, eps_from_clipped_x0);
      const FloatVec x0_x(c.x0_x), x0_m(c.x0_m), eps_x(c.eps_x), eps_m(c.eps_m), eps_x0(c.eps_x0);
      const FloatVec prev_x0(c.prev_x0), prev_eps(c.prev_eps), prev_z(c.prev_z);
      map_blocks<scalar_t, 2, 2>(
          {prev_data + first, x0_data + first}, {x_data + first, m_data + first}, piece_noise, count,
          [&](const std::array<FloatVec, 2>& in, const FloatVec& noise_value) {
            const FloatVec pred_x0 = at::vec::clamp(fmadd(in[0], x0_x, in[1] * x0_m), low, high);
            const FloatVec eps = fmadd(in[0], eps_x, fmadd(in[1], eps_m, pred_x0 * eps_x0));
            const FloatVec prev_value = fmadd(pred_x0, prev_x0, fmadd(eps, prev_eps, noise_value * prev_z));
            return std::array<FloatVec, 2>{prev_value, pred_x0};
          });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

// out = sum_k w_k inputs[k] + w_z z per element, with (w_0, ..., w_z) = weights(sample) per sample: the
// shape of every step but DDIM. inputs[0] is the sample; `noise` is contiguous or undefined; `out` is
// contiguous, like the sample.
template <size_t kInputs, typename Weights>
void affine_step(const std::array<const at::Tensor*, kInputs>& inputs, const at::Tensor& noise,
                 std::optional<int64_t> seed, bool draws, const Weights& weights, at::Tensor& out) {
  const at::Tensor& x = *inputs[0];
  AT_DISPATCH_V2(x.scalar_type(), "affine_step", AT_WRAP([&] {
    std::array<const scalar_t*, kInputs> input_data;
    for (size_t k = 0; k < kInputs; ++k) input_data[k] = inputs[k]->template const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    for_each_piece(x.numel(), elements_per_sample(x), noise_source<scalar_t>(noise, seed, draws),
                   [&](int64_t sample_index, int64_t first, int64_t count, const float* piece_noise) {
      const std::array<float, kInputs + 1> w = weights(sample_index);
      std::array<FloatVec, kInputs> input_weights;
      std::array<const scalar_t*, kInputs> piece_inputs;
      for (size_t k = 0; k < kInputs; ++k) {
        input_weights[k] = FloatVec(w[k]);
        piece_inputs[k] = input_data[k] + first;
      }
      const FloatVec noise_weight(w[kInputs]);
      map_blocks<scalar_t, 1, kInputs>({out_data + first}, piece_inputs, piece_noise, count,
                                       [&](const std::array<FloatVec, kInputs>& in, const FloatVec& noise_value) {
                                         FloatVec sum = noise_value * noise_weight;
                                         for (size_t k = 0; k < kInputs; ++k) sum = fmadd(in[k], input_weights[k], sum);
                                         return std::array<FloatVec, 1>{sum};
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
  affine_step<2>({&*x, &*v}, *z, seed, stochastic, [&](int64_t sample_index) {
    const float s = level.at(sample_index);
    const float s_next = level_next.at(sample_index);
    if (!stochastic) return std::array<float, 3>{1.0f, s_next - s, 0.0f};  // x + (s' - s) v
    const float keep = 1.0f - s_next;
    return std::array<float, 3>{keep, -keep * s, s_next};  // (1 - s') (x - s v) + s' z
  }, out);
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
  affine_step<3>({&*x, &*v, &*v_next}, at::Tensor(), std::nullopt, false,
                 [&](int64_t sample_index) {
                   const float half_step = (level_next.at(sample_index) - level.at(sample_index)) * 0.5f;
                   return std::array<float, 4>{1.0f, half_step, half_step, 0.0f};  // x + h (v1 + v2)
                 }, out);
}

void renoise_into(const at::Tensor& sample, const std::optional<at::Tensor>& level_from, double level_from_value,
                  const std::optional<at::Tensor>& level_to, double level_to_value, int64_t schedule,
                  const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, at::Tensor& out) {
  const Contiguous x = sample.expect_contiguous();
  const Contiguous z = contiguous_noise(noise, true);
  at::Tensor level_from_values, level_to_values;
  const ScheduleValue start = schedule_value(level_from, level_from_value, level_from_values);
  const ScheduleValue end = schedule_value(level_to, level_to_value, level_to_values);
  affine_step<1>({&*x}, *z, seed, true, [&](int64_t sample_index) {
    const float from = start.at(sample_index);
    const float to = end.at(sample_index);
    if (schedule == 0) {  // vp: levels are alpha_prod
      const float ratio = to / from;
      return std::array<float, 2>{std::sqrt(ratio), std::sqrt(std::max(1.0f - ratio, 0.0f))};
    }
    // flow: levels are sigmas
    const float scale = (1.0f - to) / (1.0f - from);
    return std::array<float, 2>{scale, std::sqrt(std::max(to * to - scale * scale * from * from, 0.0f))};
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
