// Host launchers of the CUDA kernels, as the torch bindings call them. Plain C++ (raw pointers, sizes,
// a cudaStream_t) so that the .cu files that define them compile without any torch header.
//
// Every launcher enqueues its kernels on `stream` and returns; the caller checks cudaGetLastError(), which
// also reports a runtime call of the launcher that failed (a memset: the launcher then launches nothing).
// Data pointers are contiguous arrays of `dtype`; any alignment is accepted (128-bit accesses are used
// where the pointers allow them). Zero-size inputs launch nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/schedule.h"

namespace fastsearch::gpu {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// The op schemas' integer codes.
enum class PredictionType : int32_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum class RenoiseSchedule : int32_t { kVp = 0, kFlow = 1 };

// Where a step's Gaussian noise comes from: a tensor like the sample, the Philox stream under a seed
// (element e takes normal z_e), or nowhere.
struct NoiseSource {
  const void* tensor;  // noise with the sample's dtype and size, or nullptr
  int64_t seed;        // used when tensor is nullptr and seed >= 0
};

constexpr NoiseSource kNoNoise{nullptr, -1};

// Steps over `numel` elements; sample b owns elements [b per_sample, (b + 1) per_sample).
// The noise is read only where the op's formula has a noise term (eta > 0, stochastic Euler).
// An output may be the very array of an input or of the noise (an in-place step: one thread reads every
// input element before it writes the same output element); it must not overlap one otherwise, nor the
// schedule values, nor the other output.
void launch_ddim_step(DType dtype, const void* sample, const void* model_output, ScheduleValue alpha_prod_t,
                      ScheduleValue alpha_prod_t_prev, float eta, NoiseSource noise, PredictionType prediction_type,
                      bool clip_sample, float clip_sample_range, bool use_clipped_model_output, void* prev_sample,
                      void* pred_original_sample, int64_t numel, int64_t per_sample, cudaStream_t stream);

void launch_flow_euler_step(DType dtype, const void* sample, const void* velocity, ScheduleValue sigma,
                            ScheduleValue sigma_next, NoiseSource noise, bool stochastic, void* prev_sample,
                            int64_t numel, int64_t per_sample, cudaStream_t stream);

void launch_flow_heun_step(DType dtype, const void* sample, const void* velocity, const void* velocity_next,
                           ScheduleValue sigma, ScheduleValue sigma_next, void* prev_sample, int64_t numel,
                           int64_t per_sample, cudaStream_t stream);

void launch_renoise(DType dtype, const void* sample, ScheduleValue level_from, ScheduleValue level_to,
                    RenoiseSchedule schedule, NoiseSource noise, void* out, int64_t numel, int64_t per_sample,
                    cudaStream_t stream);

// out[i] = z_(offset + i) for i < numel.
void launch_randn_fill(DType dtype, void* out, int64_t numel, uint64_t seed, uint64_t offset, cudaStream_t stream);

// Floats of scratch memory launch_zo_neighbors needs for `rows` = batch * num_neighbors rows of `dim`.
int64_t zo_neighbors_workspace_floats(int64_t rows, int64_t dim);

// pivot [batch, dim] -> out [batch, num_neighbors, dim]; `workspace` holds
// zo_neighbors_workspace_floats(batch * num_neighbors, dim) floats and is overwritten.
void launch_zo_neighbors(DType dtype, const void* pivot, int64_t batch, int64_t num_neighbors, int64_t dim,
                         double cos_sim, uint64_t seed, float* workspace, void* out, cudaStream_t stream);

}  // namespace fastsearch::gpu
