"""Sampler steps in Triton: DDIM, flow-matching Euler and Heun, re-noising (formulas: csrc/README.md).

Every step is one pass over memory on the same grid: program ``(b, w)`` takes window ``w`` of sample
``b`` (see ``philox.segment_window``), so the schedule values and everything derived from them are
per-program scalars, and noise drawn from ``seed`` is one ``stream_normals`` call per window.

The launchers write into outputs the caller gives (contiguous, like the sample). An output may be an input
itself, for an in-place step: each element belongs to one program, which loads it from every input before
it stores it, and a stored value depends on the loaded ones, so no element is read after it was written.
"""

import array

import triton
import triton.language as tl

from ._device import launches_on_tensor_device
from .philox import plan_windows, segment_window, store_window, stream_normals


@triton.jit
def _sample_window(numel_per_sample, windows_per_sample, BLOCK: tl.constexpr):
    """This program's sample, and its window of that sample (see ``segment_window``)."""
    pid = tl.program_id(0)
    sample = pid // windows_per_sample
    first_counter, offsets, mask = segment_window(sample.to(tl.int64) * numel_per_sample, numel_per_sample,
                                                  pid % windows_per_sample, BLOCK)
    return sample, first_counter, offsets, mask


@triton.jit
def _level(level_ptr, level_stride, level_value, sample, FROM_TENSOR: tl.constexpr):
    """A schedule value of ``sample``: from the tensor (stride 0 for one shared value), else the float."""
    if FROM_TENSOR:
        level_value = tl.load(level_ptr + sample * level_stride)
    return level_value


@triton.jit
def _load(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _noise(noise_ptr, seed, first_counter, offsets, mask, SEEDED: tl.constexpr, BLOCK: tl.constexpr):
    """The window's noise: drawn from the stream under ``seed``, or read from the noise tensor."""
    if SEEDED:
        noise = stream_normals(seed, first_counter, BLOCK)
    else:
        noise = _load(noise_ptr, offsets, mask)
    return noise


@triton.jit(do_not_specialize=["seed"])
def _ddim_step_kernel(sample_ptr, model_output_ptr, noise_ptr, prev_ptr, x0_ptr,
                      alpha_ptr, alpha_stride, alpha_value, alpha_prev_ptr, alpha_prev_stride, alpha_prev_value,
                      eta, clip_sample_range, seed: tl.int64, numel_per_sample, windows_per_sample,
                      ALPHA_FROM_TENSOR: tl.constexpr, ALPHA_PREV_FROM_TENSOR: tl.constexpr,
                      PREDICTION_TYPE: tl.constexpr, CLIP: tl.constexpr, USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
                      NOISE: tl.constexpr, SEEDED: tl.constexpr, BLOCK: tl.constexpr):
    sample, first_counter, offsets, mask = _sample_window(numel_per_sample, windows_per_sample, BLOCK)
    alpha = _level(alpha_ptr, alpha_stride, alpha_value, sample, ALPHA_FROM_TENSOR)
    alpha_prev = _level(alpha_prev_ptr, alpha_prev_stride, alpha_prev_value, sample, ALPHA_PREV_FROM_TENSOR)
    beta = 1.0 - alpha
    sqrt_alpha = tl.sqrt(alpha)
    sqrt_beta = tl.sqrt(beta)
    std = eta * tl.sqrt(((1.0 - alpha_prev) / beta) * (1.0 - alpha / alpha_prev))
    # NaN stays NaN (as torch.clamp and the C++ kernels): eta 0 and alpha_prev < alpha give NaN everywhere.
    direction = tl.sqrt(tl.maximum(1.0 - alpha_prev - std * std, 0.0, propagate_nan=tl.PropagateNan.ALL))

    x = _load(sample_ptr, offsets, mask)
    model_output = _load(model_output_ptr, offsets, mask)
    if PREDICTION_TYPE == 0:
        x0 = (x - sqrt_beta * model_output) / sqrt_alpha
        eps = model_output
    elif PREDICTION_TYPE == 1:
        x0 = model_output
        eps = (x - sqrt_alpha * x0) / sqrt_beta
    else:
        x0 = sqrt_alpha * x - sqrt_beta * model_output
        eps = sqrt_alpha * model_output + sqrt_beta * x
    if CLIP:
        # NaN stays NaN, as in torch.clamp.
        x0 = tl.clamp(x0, -clip_sample_range, clip_sample_range, propagate_nan=tl.PropagateNan.ALL)
        if USE_CLIPPED_MODEL_OUTPUT:
            eps = (x - sqrt_alpha * x0) / sqrt_beta
    prev = tl.sqrt(alpha_prev) * x0 + direction * eps
    if NOISE:
        prev += std * _noise(noise_ptr, seed, first_counter, offsets, mask, SEEDED, BLOCK)
    store_window(prev_ptr, offsets, mask, prev)
    store_window(x0_ptr, offsets, mask, x0)


@triton.jit(do_not_specialize=["seed"])
def _flow_euler_step_kernel(sample_ptr, velocity_ptr, noise_ptr, prev_ptr,
                            sigma_ptr, sigma_stride, sigma_value, sigma_next_ptr, sigma_next_stride,
                            sigma_next_value, seed: tl.int64, numel_per_sample, windows_per_sample,
                            SIGMA_FROM_TENSOR: tl.constexpr, SIGMA_NEXT_FROM_TENSOR: tl.constexpr,
                            STOCHASTIC: tl.constexpr, SEEDED: tl.constexpr, BLOCK: tl.constexpr):
    sample, first_counter, offsets, mask = _sample_window(numel_per_sample, windows_per_sample, BLOCK)
    sigma = _level(sigma_ptr, sigma_stride, sigma_value, sample, SIGMA_FROM_TENSOR)
    sigma_next = _level(sigma_next_ptr, sigma_next_stride, sigma_next_value, sample, SIGMA_NEXT_FROM_TENSOR)
    x = _load(sample_ptr, offsets, mask)
    velocity = _load(velocity_ptr, offsets, mask)
    if STOCHASTIC:
        # Predict x0, then re-draw the noise part at sigma_next.
        noise = _noise(noise_ptr, seed, first_counter, offsets, mask, SEEDED, BLOCK)
        prev = (1.0 - sigma_next) * (x - sigma * velocity) + sigma_next * noise
    else:
        prev = x + (sigma_next - sigma) * velocity
    store_window(prev_ptr, offsets, mask, prev)


@triton.jit
def _flow_heun_step_kernel(sample_ptr, velocity_ptr, velocity_next_ptr, prev_ptr,
                           sigma_ptr, sigma_stride, sigma_value, sigma_next_ptr, sigma_next_stride,
                           sigma_next_value, numel_per_sample, windows_per_sample,
                           SIGMA_FROM_TENSOR: tl.constexpr, SIGMA_NEXT_FROM_TENSOR: tl.constexpr,
                           BLOCK: tl.constexpr):
    sample, first_counter, offsets, mask = _sample_window(numel_per_sample, windows_per_sample, BLOCK)
    sigma = _level(sigma_ptr, sigma_stride, sigma_value, sample, SIGMA_FROM_TENSOR)
    sigma_next = _level(sigma_next_ptr, sigma_next_stride, sigma_next_value, sample, SIGMA_NEXT_FROM_TENSOR)
    x = _load(sample_ptr, offsets, mask)
    velocity = _load(velocity_ptr, offsets, mask)
    velocity_next = _load(velocity_next_ptr, offsets, mask)
    prev = x + (sigma_next - sigma) * 0.5 * (velocity + velocity_next)
    store_window(prev_ptr, offsets, mask, prev)


@triton.jit(do_not_specialize=["seed"])
def _renoise_kernel(sample_ptr, noise_ptr, out_ptr,
                    start_ptr, start_stride, start_value, end_ptr, end_stride, end_value,
                    seed: tl.int64, numel_per_sample, windows_per_sample,
                    START_FROM_TENSOR: tl.constexpr, END_FROM_TENSOR: tl.constexpr, SCHEDULE: tl.constexpr,
                    SEEDED: tl.constexpr, BLOCK: tl.constexpr):
    sample, first_counter, offsets, mask = _sample_window(numel_per_sample, windows_per_sample, BLOCK)
    start = _level(start_ptr, start_stride, start_value, sample, START_FROM_TENSOR)
    end = _level(end_ptr, end_stride, end_value, sample, END_FROM_TENSOR)
    # The noise variance as a product of differences: exactly 0 for equal levels, no cancellation for nearby ones.
    if SCHEDULE == 0:
        # VP: the levels are alpha_prod, noisier is smaller; 1 - to / from = (from - to) / from.
        scale = tl.sqrt(end / start)
        variance = (start - end) / start
    else:
        # Rectified flow x_s = (1 - s) x0 + s noise: keep x0's share, top the noise up to s_to;
        # to^2 - scale^2 from^2 = (to - scale from)(to + scale from), to - scale from = (to - from) / (1 - from).
        scale = (1.0 - end) / (1.0 - start)
        variance = ((end - start) / (1.0 - start)) * (end + scale * start)
    noise_scale = tl.sqrt(tl.maximum(variance, 0.0, propagate_nan=tl.PropagateNan.ALL))
    x = _load(sample_ptr, offsets, mask)
    noise = _noise(noise_ptr, seed, first_counter, offsets, mask, SEEDED, BLOCK)
    kept = scale * x
    # No noise term where the variance is 0: equal levels return the sample bit for bit.
    store_window(out_ptr, offsets, mask, tl.where(noise_scale == 0.0, kept, kept + noise_scale * noise))


# -- launchers ------------------------------------------------------------------------------------------


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as the compiled launchers pass it (the interpreter would keep fp64)."""
    return array.array("f", [value])[0]


def _level_args(tensor, value, dummy):
    """A ``(Tensor? t, float value)`` schedule pair as kernel arguments (ptr, stride, value, from_tensor)."""
    if tensor is None:
        return dummy, 0, _fp32(value), False
    # The kernels index the values with stride 1 (0 for one shared value): a strided view is copied first.
    return tensor.contiguous(), (0 if tensor.numel() == 1 else 1), 0.0, True


def _noise_args(noise, seed, sample, draws: bool):
    """The noise as kernel arguments (ptr, seed, SEEDED); the sample stands in for an unread pointer."""
    if draws and noise is None and seed is None:
        raise ValueError("this step draws noise: pass noise= (a tensor) or seed= (an int)")
    if draws and noise is not None:
        return noise.contiguous(), 0, False
    return sample, seed if draws else 0, draws


def _launch(kernel, sample, *args, **constexprs):
    """Run a step kernel over ``sample`` ([B, ...], contiguous) on the sample-window grid."""
    batch = sample.shape[0]
    numel_per_sample = sample.numel() // batch if batch else 0
    plan = plan_windows(numel_per_sample, batch, sample.is_cuda)
    kernel[(batch * plan.windows,)](*args, numel_per_sample, plan.windows, **constexprs, BLOCK=plan.block,
                                    num_warps=plan.num_warps)


@launches_on_tensor_device
def ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev, alpha_prod_t_prev_value,
              eta, noise, seed, prediction_type, clip_sample_range, use_clipped_model_output, prev, x0):
    if sample.numel() == 0:
        return
    sample, model_output = sample.contiguous(), model_output.contiguous()
    alpha_ptr, alpha_stride, alpha_value, alpha_from_tensor = _level_args(alpha_prod_t, alpha_prod_t_value, sample)
    alpha_prev_ptr, alpha_prev_stride, alpha_prev_value, alpha_prev_from_tensor = _level_args(
        alpha_prod_t_prev, alpha_prod_t_prev_value, sample)
    noise_ptr, seed, seeded = _noise_args(noise, seed, sample, eta > 0)
    clip = clip_sample_range is not None
    _launch(_ddim_step_kernel, sample, sample, model_output, noise_ptr, prev, x0,
            alpha_ptr, alpha_stride, alpha_value, alpha_prev_ptr, alpha_prev_stride, alpha_prev_value,
            _fp32(eta), _fp32(clip_sample_range) if clip else 0.0, seed,
            ALPHA_FROM_TENSOR=alpha_from_tensor, ALPHA_PREV_FROM_TENSOR=alpha_prev_from_tensor,
            PREDICTION_TYPE=prediction_type, CLIP=clip, USE_CLIPPED_MODEL_OUTPUT=clip and use_clipped_model_output,
            NOISE=eta > 0, SEEDED=seeded)


@launches_on_tensor_device
def flow_euler_step(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed, stochastic,
                    prev):
    if sample.numel() == 0:
        return
    sample, velocity = sample.contiguous(), velocity.contiguous()
    sigma_ptr, sigma_stride, sigma_value, sigma_from_tensor = _level_args(sigma, sigma_value, sample)
    sigma_next_ptr, sigma_next_stride, sigma_next_value, sigma_next_from_tensor = _level_args(
        sigma_next, sigma_next_value, sample)
    noise_ptr, seed, seeded = _noise_args(noise, seed, sample, stochastic)
    _launch(_flow_euler_step_kernel, sample, sample, velocity, noise_ptr, prev,
            sigma_ptr, sigma_stride, sigma_value, sigma_next_ptr, sigma_next_stride, sigma_next_value, seed,
            SIGMA_FROM_TENSOR=sigma_from_tensor, SIGMA_NEXT_FROM_TENSOR=sigma_next_from_tensor,
            STOCHASTIC=stochastic, SEEDED=seeded)


@launches_on_tensor_device
def flow_heun_step(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, prev):
    if sample.numel() == 0:
        return
    sample, velocity, velocity_next = sample.contiguous(), velocity.contiguous(), velocity_next.contiguous()
    sigma_ptr, sigma_stride, sigma_value, sigma_from_tensor = _level_args(sigma, sigma_value, sample)
    sigma_next_ptr, sigma_next_stride, sigma_next_value, sigma_next_from_tensor = _level_args(
        sigma_next, sigma_next_value, sample)
    _launch(_flow_heun_step_kernel, sample, sample, velocity, velocity_next, prev,
            sigma_ptr, sigma_stride, sigma_value, sigma_next_ptr, sigma_next_stride, sigma_next_value,
            SIGMA_FROM_TENSOR=sigma_from_tensor, SIGMA_NEXT_FROM_TENSOR=sigma_next_from_tensor)


@launches_on_tensor_device
def renoise(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out):
    if sample.numel() == 0:
        return
    sample = sample.contiguous()
    start_ptr, start_stride, start_value, start_from_tensor = _level_args(level_from, level_from_value, sample)
    end_ptr, end_stride, end_value, end_from_tensor = _level_args(level_to, level_to_value, sample)
    noise_ptr, seed, seeded = _noise_args(noise, seed, sample, True)
    _launch(_renoise_kernel, sample, sample, noise_ptr, out,
            start_ptr, start_stride, start_value, end_ptr, end_stride, end_value, seed,
            START_FROM_TENSOR=start_from_tensor, END_FROM_TENSOR=end_from_tensor, SCHEDULE=schedule,
            SEEDED=seeded)
