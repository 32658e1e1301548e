// Whole-argument-list checks for each op, shared by the CPU kernels and the CUDA bindings, so that every
// compiled backend rejects bad input with the same messages (and the same ones as fastsearch/ops/*.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"

namespace fastsearch {

inline void check_ddim_step_args(const at::Tensor& sample, const at::Tensor& model_output,
                                 const std::optional<at::Tensor>& alpha_prod_t,
                                 const std::optional<at::Tensor>& alpha_prod_t_prev, double eta,
                                 const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                 int64_t prediction_type, std::optional<double> clip_sample_range) {
  check_sample(sample);
  check_like(model_output, sample, "model_output");
  check_schedule(alpha_prod_t, sample, "alpha_prod_t");
  check_schedule(alpha_prod_t_prev, sample, "alpha_prod_t_prev");
  // Written so that NaN fails: NaN and inf are refused.
  TORCH_CHECK_VALUE(std::isfinite(eta) && eta >= 0, "eta must be a finite number >= 0, got ", eta);
  check_noise(noise, seed, sample, eta > 0);
  TORCH_CHECK_VALUE(prediction_type >= 0 && prediction_type <= 2,
                    "prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ", prediction_type);
  TORCH_CHECK_VALUE(!clip_sample_range.has_value() || *clip_sample_range > 0,
                    "clip_sample_range must be positive, got ", clip_sample_range.value_or(0.0));
}

inline void check_flow_euler_step_args(const at::Tensor& sample, const at::Tensor& velocity,
                                       const std::optional<at::Tensor>& sigma,
                                       const std::optional<at::Tensor>& sigma_next,
                                       const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                                       bool stochastic) {
  check_sample(sample);
  check_like(velocity, sample, "velocity");
  check_schedule(sigma, sample, "sigma");
  check_schedule(sigma_next, sample, "sigma_next");
  TORCH_CHECK_VALUE(stochastic || (!noise.has_value() && !seed.has_value()),
                    "the deterministic Euler step takes no noise; pass stochastic=True to use it");
  check_noise(noise, seed, sample, stochastic);
}

inline void check_flow_heun_step_args(const at::Tensor& sample, const at::Tensor& velocity,
                                      const at::Tensor& velocity_next, const std::optional<at::Tensor>& sigma,
                                      const std::optional<at::Tensor>& sigma_next) {
  check_sample(sample);
  check_like(velocity, sample, "velocity");
  check_like(velocity_next, sample, "velocity_next");
  check_schedule(sigma, sample, "sigma");
  check_schedule(sigma_next, sample, "sigma_next");
}

inline void check_renoise_args(const at::Tensor& sample, const std::optional<at::Tensor>& level_from,
                               const std::optional<at::Tensor>& level_to, int64_t schedule,
                               const std::optional<at::Tensor>& noise, std::optional<int64_t> seed) {
  check_sample(sample);
  check_schedule(level_from, sample, "level_from");
  check_schedule(level_to, sample, "level_to");
  TORCH_CHECK_VALUE(schedule == 0 || schedule == 1, "schedule must be 0 (vp) or 1 (flow), got ", schedule);
  check_noise(noise, seed, sample, true);
}

// The stream has 2**63 positions (fastsearch/seeding.py): offset >= 0 and offset + numel <= 2**63, so that no
// backend's int64 element index or uint64 counter wraps around. out may be 0-d (one normal).
inline void check_randn_fill_args(const at::Tensor& out, int64_t seed, int64_t offset) {
  check_float_dtype(out, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be in [0, 2**63), got ", offset);
  const int64_t numel = out.numel();
  // offset + numel <= 2**63, written without overflow: 2**63 - numel = (INT64_MAX - numel) + 1.
  TORCH_CHECK_VALUE(numel == 0 || offset <= std::numeric_limits<int64_t>::max() - numel + 1,
                    "offset + the number of elements must be at most 2**63 (the stream's length), got offset=", offset,
                    " for ", numel, " elements");
}

inline void check_zo_neighbors_args(const at::Tensor& pivot, int64_t num_neighbors, double cos_sim, int64_t seed) {
  check_sample(pivot, "pivot");
  TORCH_CHECK_VALUE(pivot.numel() == 0 || pivot.numel() / pivot.size(0) >= 2,
                    "pivot needs at least 2 elements per sample (a direction orthogonal to it), got shape ",
                    pivot.sizes());
  TORCH_CHECK_VALUE(num_neighbors >= 1, "num_neighbors must be at least 1, got ", num_neighbors);
  TORCH_CHECK_VALUE(cos_sim >= -1.0 && cos_sim <= 1.0, "cos_sim must be in [-1, 1], got ", cos_sim);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2**63), got ", seed);
}

}  // namespace fastsearch
