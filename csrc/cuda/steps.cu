// CUDA sampler steps: DDIM, flow-matching Euler / Heun, re-noising. Formulas: csrc/README.md.
//
// All four are one element-wise driver (step_kernel) over an op functor that says how to turn a
// sample's schedule values into per-sample coefficients (once per sample a thread meets, not once per
// element) and how to combine one element's inputs and noise. Loads and stores are 128-bit where every
// pointer is 16-byte aligned; the math is fp32 whatever the storage type.
//
// Outputs may alias inputs element for element (the `.out` overloads' in-place steps): a thread loads a
// unit of every input (and of the noise) before it stores that unit of the outputs, and no two threads share
// a unit, so no element is read after it was written. (The `__restrict__` of load_unit and store_unit
// promises only that each call, which touches one array, sees it through that pointer alone.)
#include "cuda/device_common.cuh"

namespace fastsearch::gpu {
namespace {

constexpr int kThreads = 256;
// Each thread handles this many 16-byte units, kThreads units apart: enough work per thread to amortise
// finding its sample's coefficients, while a warp's accesses stay contiguous.
constexpr int kUnitsPerThread = 4;
// At most 64 registers a thread, so that an SM keeps 1024 threads' loads in flight.
constexpr int kMinBlocksPerSm = 4;

enum class NoiseMode { kNone, kTensor, kSeed };

// Which noise modes an op is instantiated for.
enum class NoiseUse { kNever, kOptional, kAlways };

template <typename T, int kInputs, int kOutputs>
struct StepArrays {
  const T* inputs[kInputs];
  const T* noise;  // read in NoiseMode::kTensor
  T* outputs[kOutputs];
};

struct DdimStep {
  static constexpr int kInputs = 2;   // sample, model_output
  static constexpr int kOutputs = 2;  // prev_sample, pred_original_sample
  static constexpr NoiseUse kNoise = NoiseUse::kOptional;

  ScheduleValue alpha_prod_t;
  ScheduleValue alpha_prod_t_prev;
  float eta;
  PredictionType prediction_type;
  bool clip_sample;
  float clip_sample_range;
  bool use_clipped_model_output;

  struct Coeffs {
    float sqrt_alpha;
    float sqrt_beta;
    float sqrt_alpha_prev;
    float direction;  // sqrt(1 - a' - std^2), the weight of eps
    float std_dev;
  };

  __device__ Coeffs coeffs(int64_t sample) const {
    const float alpha = alpha_prod_t.at(sample);
    const float alpha_prev = alpha_prod_t_prev.at(sample);
    const float beta = 1.0f - alpha;
    const float std_dev = eta * sqrtf(((1.0f - alpha_prev) / beta) * (1.0f - alpha / alpha_prev));
    return Coeffs{sqrtf(alpha), sqrtf(beta), sqrtf(alpha_prev),
                  sqrtf(clamp_min(1.0f - alpha_prev - std_dev * std_dev, 0.0f)), std_dev};
  }

  template <bool kWithNoise>
  __device__ void apply(const Coeffs& c, const float (&in)[kInputs], float noise, float (&out)[kOutputs]) const {
    const float x = in[0];
    const float m = in[1];
    float x0;
    float eps;
    switch (prediction_type) {
      case PredictionType::kEpsilon:
        x0 = (x - c.sqrt_beta * m) / c.sqrt_alpha;
        eps = m;
        break;
      case PredictionType::kSample:
        x0 = m;
        eps = (x - c.sqrt_alpha * x0) / c.sqrt_beta;
        break;
      default:  // kVPrediction
        x0 = c.sqrt_alpha * x - c.sqrt_beta * m;
        eps = c.sqrt_alpha * m + c.sqrt_beta * x;
        break;
    }
    if (clip_sample) {
      // Comparisons rather than fminf / fmaxf so that a NaN stays NaN, as in torch.clamp.
      x0 = x0 < -clip_sample_range ? -clip_sample_range : (x0 > clip_sample_range ? clip_sample_range : x0);
      if (use_clipped_model_output) eps = (x - c.sqrt_alpha * x0) / c.sqrt_beta;
    }
    float prev = c.sqrt_alpha_prev * x0 + c.direction * eps;
    if constexpr (kWithNoise) prev += c.std_dev * noise;
    out[0] = prev;
    out[1] = x0;
  }
};

// Noise present means the stochastic variant (the launcher passes none to the deterministic one).
struct FlowEulerStep {
  static constexpr int kInputs = 2;  // sample, velocity
  static constexpr int kOutputs = 1;
  static constexpr NoiseUse kNoise = NoiseUse::kOptional;

  ScheduleValue sigma;
  ScheduleValue sigma_next;

  struct Coeffs {
    float sigma;
    float sigma_next;
  };

  __device__ Coeffs coeffs(int64_t sample) const { return Coeffs{sigma.at(sample), sigma_next.at(sample)}; }

  template <bool kWithNoise>
  __device__ void apply(const Coeffs& c, const float (&in)[kInputs], float noise, float (&out)[kOutputs]) const {
    if constexpr (kWithNoise) {
      out[0] = (1.0f - c.sigma_next) * (in[0] - c.sigma * in[1]) + c.sigma_next * noise;
    } else {
      out[0] = in[0] + (c.sigma_next - c.sigma) * in[1];
    }
  }
};

struct FlowHeunStep {
  static constexpr int kInputs = 3;  // sample, velocity, velocity_next
  static constexpr int kOutputs = 1;
  static constexpr NoiseUse kNoise = NoiseUse::kNever;

  ScheduleValue sigma;
  ScheduleValue sigma_next;

  struct Coeffs {
    float half_step;  // (s' - s) / 2
  };

  __device__ Coeffs coeffs(int64_t sample) const {
    return Coeffs{(sigma_next.at(sample) - sigma.at(sample)) * 0.5f};
  }

  template <bool kWithNoise>
  __device__ void apply(const Coeffs& c, const float (&in)[kInputs], float, float (&out)[kOutputs]) const {
    static_assert(!kWithNoise, "the Heun corrector draws no noise");
    out[0] = in[0] + c.half_step * (in[1] + in[2]);
  }
};

struct Renoise {
  static constexpr int kInputs = 1;  // sample
  static constexpr int kOutputs = 1;
  static constexpr NoiseUse kNoise = NoiseUse::kAlways;

  ScheduleValue level_from;
  ScheduleValue level_to;
  RenoiseSchedule schedule;

  struct Coeffs {
    float scale;
    float noise_scale;
  };

  __device__ Coeffs coeffs(int64_t sample) const {
    // The noise variance as a product of differences (as every backend computes it): exactly 0 for equal
    // levels, no cancellation for nearby ones. vp: 1 - to / from = (from - to) / from; flow:
    // to^2 - scale^2 from^2 = (to - scale from)(to + scale from) with to - scale from = (to - from) / (1 - from).
    const float from = level_from.at(sample);
    const float to = level_to.at(sample);
    float scale;
    float variance;
    if (schedule == RenoiseSchedule::kVp) {
      scale = sqrtf(to / from);
      variance = (from - to) / from;
    } else {
      scale = (1.0f - to) / (1.0f - from);
      variance = ((to - from) / (1.0f - from)) * (to + scale * from);
    }
    return Coeffs{scale, sqrtf(clamp_min(variance, 0.0f))};  // clamp_min keeps NaN
  }

  template <bool kWithNoise>
  __device__ void apply(const Coeffs& c, const float (&in)[kInputs], float noise, float (&out)[kOutputs]) const {
    static_assert(kWithNoise, "re-noising always draws noise");
    const float kept = c.scale * in[0];
    // No noise term where its scale is 0: equal levels return the sample bit for bit.
    out[0] = c.noise_scale == 0.0f ? kept : kept + c.noise_scale * noise;
  }
};

// The kVec elements from `first` on, in storage form (converted as they are used, which keeps fp16 and
// bf16 units in half the registers); past the first `count` they are zeros.
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_unit(const T* __restrict__ src, int64_t first, int count, bool packed) {
  if (packed) return *reinterpret_cast<const Pack<T, kVec>*>(src + first);
  Pack<T, kVec> unit;
#pragma unroll
  for (int j = 0; j < kVec; ++j) unit.values[j] = j < count ? src[first + j] : from_float<T>(0.0f);
  return unit;
}

template <typename T, int kVec>
__device__ __forceinline__ void store_unit(T* __restrict__ dst, int64_t first, int count, bool packed,
                                           const Pack<T, kVec>& unit) {
  if (packed) {
    *reinterpret_cast<Pack<T, kVec>*>(dst + first) = unit;
    return;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (j < count) dst[first + j] = unit.values[j];
  }
}

template <typename Op, typename T, NoiseMode kNoiseMode>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    step_kernel(Op op, StepArrays<T, Op::kInputs, Op::kOutputs> arrays, int64_t numel, int64_t per_sample,
                uint64_t seed, bool aligned) {
  // One unit is 16 bytes of every array; kVec is a multiple of 4, so a unit starts a Philox block.
  constexpr int kVec = 16 / sizeof(T);
  constexpr bool kWithNoise = kNoiseMode != NoiseMode::kNone;

  // The sample whose coefficients `coeffs` holds ends at element `sample_end`; 0 means none yet.
  int64_t sample = 0;
  int64_t sample_end = 0;
  typename Op::Coeffs coeffs{};

  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * kThreads * kUnitsPerThread + threadIdx.x;
  for (int step = 0; step < kUnitsPerThread; ++step) {
    const int64_t first = (first_unit + static_cast<int64_t>(step) * kThreads) * kVec;
    if (first >= numel) return;
    const int count = numel - first < kVec ? static_cast<int>(numel - first) : kVec;
    const bool packed = aligned && count == kVec;

    using Unit = Pack<T, kVec>;
    Unit in[Op::kInputs];
#pragma unroll
    for (int k = 0; k < Op::kInputs; ++k) in[k] = load_unit<T, kVec>(arrays.inputs[k], first, count, packed);

    // Seeded noise stays fp32: it is never rounded to the storage type.
    Unit noise_unit;
    float normals[kVec / 4][4];
    if constexpr (kNoiseMode == NoiseMode::kTensor) {
      noise_unit = load_unit<T, kVec>(arrays.noise, first, count, packed);
    } else if constexpr (kNoiseMode == NoiseMode::kSeed) {
#pragma unroll
      for (int quad = 0; quad < kVec / 4; ++quad) {
        stream_normals(seed, static_cast<uint64_t>(first) / 4 + quad, normals[quad]);
      }
    }

    // Units are visited in increasing order, so the cached sample is either this unit's or behind it.
    if (first >= sample_end) {
      sample = first / per_sample;
      sample_end = (sample + 1) * per_sample;
      coeffs = op.coeffs(sample);
    }
    // One pass per sample the unit overlaps: a single pass unless per_sample is not a multiple of kVec.
    Unit out[Op::kOutputs] = {};
    int pass_begin = 0;
    for (;;) {
      // This pass covers the unit's elements [pass_begin, pass_end).
      const int pass_end = sample_end - first < count ? static_cast<int>(sample_end - first) : count;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < pass_begin || j >= pass_end) continue;
        float element_in[Op::kInputs];
#pragma unroll
        for (int k = 0; k < Op::kInputs; ++k) element_in[k] = to_float(in[k].values[j]);
        float noise = 0.0f;
        if constexpr (kNoiseMode == NoiseMode::kTensor) {
          noise = to_float(noise_unit.values[j]);
        } else if constexpr (kNoiseMode == NoiseMode::kSeed) {
          noise = normals[j / 4][j % 4];
        }
        float element_out[Op::kOutputs];
        op.template apply<kWithNoise>(coeffs, element_in, noise, element_out);
#pragma unroll
        for (int k = 0; k < Op::kOutputs; ++k) out[k].values[j] = from_float<T>(element_out[k]);
      }
      if (pass_end == count) break;
      pass_begin = pass_end;
      ++sample;
      sample_end += per_sample;
      coeffs = op.coeffs(sample);
    }

#pragma unroll
    for (int k = 0; k < Op::kOutputs; ++k) store_unit<T, kVec>(arrays.outputs[k], first, count, packed, out[k]);
  }
}

template <typename Op, typename T, NoiseMode kNoiseMode>
void run_step(const Op& op, const StepArrays<T, Op::kInputs, Op::kOutputs>& arrays, int64_t numel, int64_t per_sample,
              uint64_t seed, cudaStream_t stream) {
  using Unit = Pack<T, 16 / sizeof(T)>;
  bool aligned = kNoiseMode != NoiseMode::kTensor || is_aligned_for<Unit>(arrays.noise);
  for (const T* input : arrays.inputs) aligned = aligned && is_aligned_for<Unit>(input);
  for (T* output : arrays.outputs) aligned = aligned && is_aligned_for<Unit>(output);
  const int64_t elements_per_block = static_cast<int64_t>(kThreads) * kUnitsPerThread * (16 / sizeof(T));
  step_kernel<Op, T, kNoiseMode><<<blocks_for(numel, elements_per_block), kThreads, 0, stream>>>(
      op, arrays, numel, per_sample, seed, aligned);
}

// Picks the kernel for where the noise comes from, instantiating only the modes the op can meet.
template <typename Op, typename T>
void launch_step(const Op& op, const StepArrays<T, Op::kInputs, Op::kOutputs>& arrays, NoiseSource noise,
                 int64_t numel, int64_t per_sample, cudaStream_t stream) {
  if (numel == 0) return;
  const uint64_t seed = static_cast<uint64_t>(noise.seed);
  if constexpr (Op::kNoise == NoiseUse::kNever) {
    run_step<Op, T, NoiseMode::kNone>(op, arrays, numel, per_sample, seed, stream);
  } else {
    if (noise.tensor != nullptr) {
      run_step<Op, T, NoiseMode::kTensor>(op, arrays, numel, per_sample, seed, stream);
    } else if (Op::kNoise == NoiseUse::kAlways || noise.seed >= 0) {
      run_step<Op, T, NoiseMode::kSeed>(op, arrays, numel, per_sample, seed, stream);
    } else if constexpr (Op::kNoise == NoiseUse::kOptional) {
      run_step<Op, T, NoiseMode::kNone>(op, arrays, numel, per_sample, seed, stream);
    }
  }
}

template <typename T>
const T* typed(const void* pointer) {
  return static_cast<const T*>(pointer);
}

template <typename T>
T* typed(void* pointer) {
  return static_cast<T*>(pointer);
}

}  // namespace

void launch_ddim_step(DType dtype, const void* sample, const void* model_output, ScheduleValue alpha_prod_t,
                      ScheduleValue alpha_prod_t_prev, float eta, NoiseSource noise, PredictionType prediction_type,
                      bool clip_sample, float clip_sample_range, bool use_clipped_model_output, void* prev_sample,
                      void* pred_original_sample, int64_t numel, int64_t per_sample, cudaStream_t stream) {
  const DdimStep op{alpha_prod_t,     alpha_prod_t_prev, eta, prediction_type, clip_sample,
                    clip_sample_range, use_clipped_model_output};
  // The noise term exists only where eta > 0.
  const NoiseSource used_noise = eta > 0.0f ? noise : kNoNoise;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const StepArrays<T, 2, 2> arrays{{typed<T>(sample), typed<T>(model_output)},
                                     typed<T>(used_noise.tensor),
                                     {typed<T>(prev_sample), typed<T>(pred_original_sample)}};
    launch_step(op, arrays, used_noise, numel, per_sample, stream);
  });
}

void launch_flow_euler_step(DType dtype, const void* sample, const void* velocity, ScheduleValue sigma,
                            ScheduleValue sigma_next, NoiseSource noise, bool stochastic, void* prev_sample,
                            int64_t numel, int64_t per_sample, cudaStream_t stream) {
  const FlowEulerStep op{sigma, sigma_next};
  const NoiseSource used_noise = stochastic ? noise : kNoNoise;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const StepArrays<T, 2, 1> arrays{
        {typed<T>(sample), typed<T>(velocity)}, typed<T>(used_noise.tensor), {typed<T>(prev_sample)}};
    launch_step(op, arrays, used_noise, numel, per_sample, stream);
  });
}

void launch_flow_heun_step(DType dtype, const void* sample, const void* velocity, const void* velocity_next,
                           ScheduleValue sigma, ScheduleValue sigma_next, void* prev_sample, int64_t numel,
                           int64_t per_sample, cudaStream_t stream) {
  const FlowHeunStep op{sigma, sigma_next};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const StepArrays<T, 3, 1> arrays{
        {typed<T>(sample), typed<T>(velocity), typed<T>(velocity_next)}, nullptr, {typed<T>(prev_sample)}};
    launch_step(op, arrays, kNoNoise, numel, per_sample, stream);
  });
}

void launch_renoise(DType dtype, const void* sample, ScheduleValue level_from, ScheduleValue level_to,
                    RenoiseSchedule schedule, NoiseSource noise, void* out, int64_t numel, int64_t per_sample,
                    cudaStream_t stream) {
  const Renoise op{level_from, level_to, schedule};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const StepArrays<T, 1, 1> arrays{{typed<T>(sample)}, typed<T>(noise.tensor), {typed<T>(out)}};
    launch_step(op, arrays, noise, numel, per_sample, stream);
  });
}

}  // namespace fastsearch::gpu
