// CUDA writers of the step ops (schemas: fastsearch/ops/steps.py): contiguous inputs, stream and device,
// then the launchers of steps.cu. The entry points (argument and out= checks, allocation) are
// common/step_entries.h, shared with the CPU kernels.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_checks.h"
#include "common/out_checks.h"
#include "common/step_entries.h"
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

// The CUDA writers of the step entry points (common/step_entries.h).
struct Writers {
  static at::Tensor empty_like(const at::Tensor& sample) { return at::empty(sample.sizes(), sample.options()); }
  static constexpr auto ddim_step = &ddim_step_into;
  static constexpr auto flow_euler_step = &flow_euler_step_into;
  static constexpr auto flow_heun_step = &flow_heun_step_into;
  static constexpr auto renoise = &renoise_into;
};

}  // namespace

TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) { StepEntries<Writers>::register_all(m); }

}  // namespace fastsearch
