// The entry points of the step ops, written once for every backend that registers them: the functional
// form checks its arguments and allocates its result, the `.out` form checks the caller's outputs
// (out_checks.h); both then hand over to the backend's writer, which fills outputs like the sample
// (contiguous) from checked arguments. Backends: csrc/cpu/steps.cpp, csrc/cuda/steps_binding.cpp.
//
// Writers, the backend's type, provides (static):
//   at::Tensor empty_like(const at::Tensor& sample);   an uninitialised contiguous tensor like sample
//   ddim_step, flow_euler_step, flow_heun_step, renoise: the writers, each taking the op's arguments
//   followed by its outputs.
#pragma once

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "common/out_checks.h"

namespace fastsearch {

template <typename Writers>
struct StepEntries {
  static std::tuple<at::Tensor, at::Tensor> ddim_step(
      const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& alpha_prod_t,
      double alpha_prod_t_value, const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value,
      double eta, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
      std::optional<double> clip_sample_range, bool use_clipped_model_output) {
    check_ddim_step_args(sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta, noise, seed, prediction_type,
                         clip_sample_range);
    at::Tensor prev_sample = Writers::empty_like(sample);
    at::Tensor pred_original_sample = Writers::empty_like(sample);
    Writers::ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev,
                       alpha_prod_t_prev_value, eta, noise, seed, prediction_type, clip_sample_range,
                       use_clipped_model_output, prev_sample, pred_original_sample);
    return {prev_sample, pred_original_sample};
  }

  static std::tuple<at::Tensor&, at::Tensor&> ddim_step_out(
      const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& alpha_prod_t,
      double alpha_prod_t_value, const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value,
      double eta, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
      std::optional<double> clip_sample_range, bool use_clipped_model_output, at::Tensor& prev_sample,
      at::Tensor& pred_original_sample) {
    check_ddim_step_args(sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta, noise, seed, prediction_type,
                         clip_sample_range);
    check_ddim_step_out(sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise, prev_sample,
                        pred_original_sample);
    Writers::ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev,
                       alpha_prod_t_prev_value, eta, noise, seed, prediction_type, clip_sample_range,
                       use_clipped_model_output, prev_sample, pred_original_sample);
    return {prev_sample, pred_original_sample};
  }

  static at::Tensor flow_euler_step(const at::Tensor& sample, const at::Tensor& velocity,
                                    const std::optional<at::Tensor>& sigma, double sigma_value,
                                    const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                                    const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                    bool stochastic) {
    check_flow_euler_step_args(sample, velocity, sigma, sigma_next, noise, seed, stochastic);
    at::Tensor out = Writers::empty_like(sample);
    Writers::flow_euler_step(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed,
                             stochastic, out);
    return out;
  }

  static at::Tensor& flow_euler_step_out(const at::Tensor& sample, const at::Tensor& velocity,
                                         const std::optional<at::Tensor>& sigma, double sigma_value,
                                         const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                                         const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                         bool stochastic, at::Tensor& out) {
    check_flow_euler_step_args(sample, velocity, sigma, sigma_next, noise, seed, stochastic);
    check_flow_euler_step_out(sample, velocity, sigma, sigma_next, noise, out);
    Writers::flow_euler_step(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed,
                             stochastic, out);
    return out;
  }

  static at::Tensor flow_heun_step(const at::Tensor& sample, const at::Tensor& velocity,
                                   const at::Tensor& velocity_next, const std::optional<at::Tensor>& sigma,
                                   double sigma_value, const std::optional<at::Tensor>& sigma_next,
                                   double sigma_next_value) {
    check_flow_heun_step_args(sample, velocity, velocity_next, sigma, sigma_next);
    at::Tensor out = Writers::empty_like(sample);
    Writers::flow_heun_step(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, out);
    return out;
  }

  static at::Tensor& flow_heun_step_out(const at::Tensor& sample, const at::Tensor& velocity,
                                        const at::Tensor& velocity_next, const std::optional<at::Tensor>& sigma,
                                        double sigma_value, const std::optional<at::Tensor>& sigma_next,
                                        double sigma_next_value, at::Tensor& out) {
    check_flow_heun_step_args(sample, velocity, velocity_next, sigma, sigma_next);
    check_flow_heun_step_out(sample, velocity, velocity_next, sigma, sigma_next, out);
    Writers::flow_heun_step(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, out);
    return out;
  }

  static at::Tensor renoise(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                            double level_from_value, const std::optional<at::Tensor>& level_to,
                            double level_to_value, int64_t schedule, const std::optional<at::Tensor>& noise,
                            std::optional<int64_t> seed) {
    check_renoise_args(sample, level_from, level_to, schedule, noise, seed);
    at::Tensor out = Writers::empty_like(sample);
    Writers::renoise(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out);
    return out;
  }

  static at::Tensor& renoise_out(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                                 double level_from_value, const std::optional<at::Tensor>& level_to,
                                 double level_to_value, int64_t schedule, const std::optional<at::Tensor>& noise,
                                 std::optional<int64_t> seed, at::Tensor& out) {
    check_renoise_args(sample, level_from, level_to, schedule, noise, seed);
    check_renoise_out(sample, level_from, level_to, noise, out);
    Writers::renoise(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out);
    return out;
  }

  // Both forms of every step op, for one backend's TORCH_LIBRARY_IMPL.
  static void register_all(torch::Library& m) {
    m.impl("ddim_step", &ddim_step);
    m.impl("flow_euler_step", &flow_euler_step);
    m.impl("flow_heun_step", &flow_heun_step);
    m.impl("renoise", &renoise);
    m.impl("ddim_step.out", &ddim_step_out);
    m.impl("flow_euler_step.out", &flow_euler_step_out);
    m.impl("flow_heun_step.out", &flow_heun_step_out);
    m.impl("renoise.out", &renoise_out);
  }
};

}  // namespace fastsearch
