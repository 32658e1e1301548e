// CUDA implementations of the step ops (schemas: fastsearch/ops/steps.py): argument checks, contiguous
// inputs, outputs, stream and device, then the launchers of steps.cu. The `.out` overloads check the
// caller's outputs (common/out_checks.h) and hand their pointers to the same launchers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_checks.h"
#include "common/out_checks.h"
#include "cuda/binding.h"
#include "cuda/launchers.h"

namespace fastsearch {
namespace {

// `contiguous` must outlive the launch: it holds the noise when `noise` was not contiguous.
gpu::NoiseSource noise_source(const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                              at::Tensor& contiguous) {
  if (noise.has_value()) {
    contiguous = noise->contiguous();
    return gpu::NoiseSource{contiguous.data_ptr(), -1};
  }
  return gpu::NoiseSource{nullptr, seed.value_or(-1)};
}

// Elements per sample: sample b owns [b N, (b + 1) N) of the flattened tensor.
int64_t per_sample(const at::Tensor& sample) {
  return sample.size(0) == 0 ? 0 : sample.numel() / sample.size(0);
}

// Writes DDIM into prev_sample and pred_original_sample (contiguous, like sample); the arguments are checked.
void ddim_step_into(const at::Tensor& sample, const at::Tensor& model_output,
                    const std::optional<at::Tensor>& alpha_prod_t, double alpha_prod_t_value,
                    const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value, double eta,
                    const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
                    std::optional<double> clip_sample_range, bool use_clipped_model_output, at::Tensor& prev_sample,
                    at::Tensor& pred_original_sample) {
  const c10::cuda::CUDAGuard device_guard(sample.device());
  const at::Tensor x = sample.contiguous();
  const at::Tensor m = model_output.contiguous();
  at::Tensor alpha_storage, alpha_prev_storage, noise_storage;
  const ScheduleValue alpha = schedule_value(alpha_prod_t, alpha_prod_t_value, alpha_storage);
  const ScheduleValue alpha_prev = schedule_value(alpha_prod_t_prev, alpha_prod_t_prev_value, alpha_prev_storage);
  const gpu::NoiseSource noise_in = noise_source(noise, seed, noise_storage);
  gpu::launch_ddim_step(gpu::dtype_of(x), x.const_data_ptr(), m.const_data_ptr(), alpha, alpha_prev,
                        static_cast<float>(eta), noise_in, static_cast<gpu::PredictionType>(prediction_type),
                        clip_sample_range.has_value(), static_cast<float>(clip_sample_range.value_or(0.0)),
                        use_clipped_model_output, prev_sample.mutable_data_ptr(),
                        pred_original_sample.mutable_data_ptr(), x.numel(), per_sample(x),
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& alpha_prod_t,
    double alpha_prod_t_value, const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value,
    double eta, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
    std::optional<double> clip_sample_range, bool use_clipped_model_output) {
  check_ddim_step_args(sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta, noise, seed, prediction_type,
                       clip_sample_range);
  at::Tensor prev_sample = at::empty(sample.sizes(), sample.options());
  at::Tensor pred_original_sample = at::empty(sample.sizes(), sample.options());
  ddim_step_into(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev, alpha_prod_t_prev_value,
                 eta, noise, seed, prediction_type, clip_sample_range, use_clipped_model_output, prev_sample,
                 pred_original_sample);
  return {prev_sample, pred_original_sample};
}

std::tuple<at::Tensor&, at::Tensor&> ddim_step_out_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& alpha_prod_t,
    double alpha_prod_t_value, const std::optional<at::Tensor>& alpha_prod_t_prev, double alpha_prod_t_prev_value,
    double eta, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t prediction_type,
    std::optional<double> clip_sample_range, bool use_clipped_model_output, at::Tensor& prev_sample,
    at::Tensor& pred_original_sample) {
  check_ddim_step_args(sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta, noise, seed, prediction_type,
                       clip_sample_range);
  check_ddim_step_out(sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise, prev_sample,
                      pred_original_sample);
  ddim_step_into(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev, alpha_prod_t_prev_value,
                 eta, noise, seed, prediction_type, clip_sample_range, use_clipped_model_output, prev_sample,
                 pred_original_sample);
  return {prev_sample, pred_original_sample};
}

void flow_euler_step_into(const at::Tensor& sample, const at::Tensor& velocity,
                          const std::optional<at::Tensor>& sigma, double sigma_value,
                          const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                          const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, bool stochastic,
                          at::Tensor& prev_sample) {
  const c10::cuda::CUDAGuard device_guard(sample.device());
  const at::Tensor x = sample.contiguous();
  const at::Tensor v = velocity.contiguous();
  at::Tensor sigma_storage, sigma_next_storage, noise_storage;
  const ScheduleValue s = schedule_value(sigma, sigma_value, sigma_storage);
  const ScheduleValue s_next = schedule_value(sigma_next, sigma_next_value, sigma_next_storage);
  const gpu::NoiseSource noise_in = noise_source(noise, seed, noise_storage);
  gpu::launch_flow_euler_step(gpu::dtype_of(x), x.const_data_ptr(), v.const_data_ptr(), s, s_next, noise_in,
                              stochastic, prev_sample.mutable_data_ptr(), x.numel(), per_sample(x),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor flow_euler_step_cuda(const at::Tensor& sample, const at::Tensor& velocity,
                                const std::optional<at::Tensor>& sigma, double sigma_value,
                                const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                                const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                bool stochastic) {
  check_flow_euler_step_args(sample, velocity, sigma, sigma_next, noise, seed, stochastic);
  at::Tensor prev_sample = at::empty(sample.sizes(), sample.options());
  flow_euler_step_into(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed, stochastic,
                       prev_sample);
  return prev_sample;
}

at::Tensor& flow_euler_step_out_cuda(const at::Tensor& sample, const at::Tensor& velocity,
                                     const std::optional<at::Tensor>& sigma, double sigma_value,
                                     const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                                     const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                     bool stochastic, at::Tensor& out) {
  check_flow_euler_step_args(sample, velocity, sigma, sigma_next, noise, seed, stochastic);
  check_flow_euler_step_out(sample, velocity, sigma, sigma_next, noise, out);
  flow_euler_step_into(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed, stochastic,
                       out);
  return out;
}

void flow_heun_step_into(const at::Tensor& sample, const at::Tensor& velocity, const at::Tensor& velocity_next,
                         const std::optional<at::Tensor>& sigma, double sigma_value,
                         const std::optional<at::Tensor>& sigma_next, double sigma_next_value,
                         at::Tensor& prev_sample) {
  const c10::cuda::CUDAGuard device_guard(sample.device());
  const at::Tensor x = sample.contiguous();
  const at::Tensor v1 = velocity.contiguous();
  const at::Tensor v2 = velocity_next.contiguous();
  at::Tensor sigma_storage, sigma_next_storage;
  const ScheduleValue s = schedule_value(sigma, sigma_value, sigma_storage);
  const ScheduleValue s_next = schedule_value(sigma_next, sigma_next_value, sigma_next_storage);
  gpu::launch_flow_heun_step(gpu::dtype_of(x), x.const_data_ptr(), v1.const_data_ptr(), v2.const_data_ptr(), s,
                             s_next, prev_sample.mutable_data_ptr(), x.numel(), per_sample(x),
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor flow_heun_step_cuda(const at::Tensor& sample, const at::Tensor& velocity, const at::Tensor& velocity_next,
                               const std::optional<at::Tensor>& sigma, double sigma_value,
                               const std::optional<at::Tensor>& sigma_next, double sigma_next_value) {
  check_flow_heun_step_args(sample, velocity, velocity_next, sigma, sigma_next);
  at::Tensor prev_sample = at::empty(sample.sizes(), sample.options());
  flow_heun_step_into(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, prev_sample);
  return prev_sample;
}

at::Tensor& flow_heun_step_out_cuda(const at::Tensor& sample, const at::Tensor& velocity,
                                    const at::Tensor& velocity_next, const std::optional<at::Tensor>& sigma,
                                    double sigma_value, const std::optional<at::Tensor>& sigma_next,
                                    double sigma_next_value, at::Tensor& out) {
  check_flow_heun_step_args(sample, velocity, velocity_next, sigma, sigma_next);
  check_flow_heun_step_out(sample, velocity, velocity_next, sigma, sigma_next, out);
  flow_heun_step_into(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, out);
  return out;
}

void renoise_into(const at::Tensor& sample, const std::optional<at::Tensor>& level_from, double level_from_value,
                  const std::optional<at::Tensor>& level_to, double level_to_value, int64_t schedule,
                  const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(sample.device());
  const at::Tensor x = sample.contiguous();
  at::Tensor from_storage, to_storage, noise_storage;
  const ScheduleValue from = schedule_value(level_from, level_from_value, from_storage);
  const ScheduleValue to = schedule_value(level_to, level_to_value, to_storage);
  const gpu::NoiseSource noise_in = noise_source(noise, seed, noise_storage);
  gpu::launch_renoise(gpu::dtype_of(x), x.const_data_ptr(), from, to, static_cast<gpu::RenoiseSchedule>(schedule),
                      noise_in, out.mutable_data_ptr(), x.numel(), per_sample(x), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor renoise_cuda(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                        double level_from_value, const std::optional<at::Tensor>& level_to, double level_to_value,
                        int64_t schedule, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed) {
  check_renoise_args(sample, level_from, level_to, schedule, noise, seed);
  at::Tensor out = at::empty(sample.sizes(), sample.options());
  renoise_into(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out);
  return out;
}

at::Tensor& renoise_out_cuda(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                             double level_from_value, const std::optional<at::Tensor>& level_to,
                             double level_to_value, int64_t schedule, const std::optional<at::Tensor>& noise,
                             std::optional<int64_t> seed, at::Tensor& out) {
  check_renoise_args(sample, level_from, level_to, schedule, noise, seed);
  check_renoise_out(sample, level_from, level_to, noise, out);
  renoise_into(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) {
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("flow_euler_step", &flow_euler_step_cuda);
  m.impl("flow_heun_step", &flow_heun_step_cuda);
  m.impl("renoise", &renoise_cuda);
  m.impl("ddim_step.out", &ddim_step_out_cuda);
  m.impl("flow_euler_step.out", &flow_euler_step_out_cuda);
  m.impl("flow_heun_step.out", &flow_heun_step_out_cuda);
  m.impl("renoise.out", &renoise_out_cuda);
}

}  // namespace fastsearch
