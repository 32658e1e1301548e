"""diffusers drop-in schedulers whose ``step`` is one fused kernel call, and also takes per-sample timesteps.

:class:`FastDDIMScheduler` and :class:`FastFlowMatchEulerDiscreteScheduler` subclass diffusers' ``DDIMScheduler``
and ``FlowMatchEulerDiscreteScheduler``: same config (``from_config`` works both ways), same outputs, and ``step``
also takes a [B] tensor of per-sample timesteps.

diffusers has no public way to set a flow-matching scheduler's step index (only ``set_timesteps``, which resets
it, and ``set_begin_index``, which sets where the first step starts); :class:`FastFlowMatchEulerDiscreteScheduler`
keeps diffusers' own bookkeeping of it, so it writes the private ``_step_index`` and calls ``_init_step_index``
exactly where diffusers' ``step`` does (the places are marked).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

import fastsearch
from fastsearch.checks import FLOAT_DTYPES


def _per_sample_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor | None:
    """``timestep`` as a [B] tensor when it holds one timestep per sample, None when it is one timestep."""
    if not isinstance(timestep, torch.Tensor) or timestep.numel() == 1:
        return None
    if timestep.dim() != 1 or timestep.shape[0] != sample.shape[0]:
        raise ValueError(f"timestep must be a scalar or a tensor of shape [B]={[sample.shape[0]]} (one per sample), "
                         f"got shape {list(timestep.shape)}")
    return timestep


def _kernel_covers(model_output: torch.Tensor, sample: torch.Tensor, *, same_dtype: bool) -> bool:
    """Whether the fused kernels take these tensors (else the parent's step runs)."""
    return (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
            and sample.dtype in FLOAT_DTYPES and model_output.dtype in FLOAT_DTYPES
            and model_output.shape == sample.shape and (model_output.dtype == sample.dtype or not same_dtype))


def _stack_outputs(outputs: list, output_class, return_dict: bool):
    """Per-sample step outputs (each for a batch of one) as one batched output."""
    fields = {name: torch.cat([out[name] for out in outputs]) for name in outputs[0].keys()}
    return output_class(**fields) if return_dict else tuple(fields.values())


class FastDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` whose ``step`` is one :func:`fastsearch.ddim_step` kernel call.

    Same config and outputs as diffusers' scheduler; its ``step`` also takes ``timestep`` as an int64 [B]
    tensor, each sample then stepping from its own timestep ``t`` to ``t - T // N``. In float32 the results
    agree with the stock scheduler to rounding. The kernel computes in fp32 registers whatever the input
    dtype, where diffusers computes in the sample's dtype, so float16 / bfloat16 results differ by about that
    dtype's rounding.

    Falls back to ``DDIMScheduler.step`` (bit-for-bit the stock result) where the kernel does not cover the
    call: ``thresholding=True`` (dynamic thresholding needs a per-sample quantile), sample or model output in
    a dtype other than float32 / float16 / bfloat16, or a model output whose shape or dtype differs from the
    sample's. With per-sample timesteps, the fallback runs the stock step once per sample.

    Example:
        >>> pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)
    """

    def _alphas_on(self, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied there once (it never changes after ``__init__``)."""
        cached = getattr(self, "_alphas_by_device", None)
        if cached is None:
            cached = self._alphas_by_device = {}
        if device not in cached:
            cached[device] = self.alphas_cumprod.to(device)
        return cached[device]

    def _alpha_pair(self, timestep, per_sample: torch.Tensor | None, device: torch.device):
        step_gap = self.config.num_train_timesteps // self.num_inference_steps
        if per_sample is None:
            t = int(timestep)
            prev = t - step_gap
            alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            return float(self.alphas_cumprod[t]), float(alpha_prev)
        alphas = self._alphas_on(device)
        t = per_sample.to(device=device, dtype=torch.int64)
        prev = t - step_gap
        final = self.final_alpha_cumprod.to(device=device, dtype=alphas.dtype)
        return alphas[t], torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One DDIM step, as ``DDIMScheduler.step``, for one timestep or one timestep per sample.

        Args:
            model_output: [B, ...] the model's output (epsilon, x0 or v, per ``config.prediction_type``).
            timestep: an int, a 0-d tensor, or an int64 [B] tensor (one timestep of ``self.timesteps`` per
                sample).
            sample: [B, ...] x_t, float32 / float16 / bfloat16 (others use the stock step).
            eta, use_clipped_model_output, generator, variance_noise, return_dict: as diffusers. With
                ``eta > 0`` the noise is ``variance_noise`` or drawn exactly as diffusers draws it
                (``randn_tensor`` with ``generator``, model output's shape and dtype).

        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` (each like ``sample``), or the tuple
            ``(prev_sample, pred_original_sample)`` when ``return_dict=False``.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        per_sample = _per_sample_timesteps(timestep, sample)
        if self.config.thresholding or not _kernel_covers(model_output, sample, same_dtype=True):
            if per_sample is None:
                return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                    variance_noise, return_dict)
            return self._step_each(model_output, per_sample, sample, eta, use_clipped_model_output, generator,
                                   variance_noise, return_dict)
        noise = self._variance_noise(model_output, eta, generator, variance_noise)
        alpha, alpha_prev = self._alpha_pair(timestep, per_sample, sample.device)
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        if use_clipped_model_output and clip is None:
            # diffusers re-derives epsilon from x0 whenever asked, clipped or not: an infinite range does that.
            clip = float("inf")
        prev_sample, pred_original_sample = fastsearch.ddim_step(
            sample, model_output, alpha, alpha_prev, eta=eta, noise=noise,
            prediction_type=self.config.prediction_type, clip_sample_range=clip,
            use_clipped_model_output=use_clipped_model_output)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    @staticmethod
    def _variance_noise(model_output, eta, generator, variance_noise):
        if not eta > 0:
            return None
        if variance_noise is not None and generator is not None:
            raise ValueError("give generator or variance_noise, not both")
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        return variance_noise

    def _step_each(self, model_output, timesteps, sample, eta, use_clipped_model_output, generator, variance_noise,
                   return_dict):
        """The stock step once per sample (the fallback for per-sample timesteps)."""
        noise = self._variance_noise(model_output, eta, generator, variance_noise)
        outputs = [super(FastDDIMScheduler, self).step(
            model_output[i:i + 1], int(timesteps[i]), sample[i:i + 1], eta, use_clipped_model_output,
            variance_noise=None if noise is None else noise[i:i + 1]) for i in range(sample.shape[0])]
        return _stack_outputs(outputs, DDIMSchedulerOutput, return_dict)


class FastFlowMatchEulerDiscreteScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``step`` is one :func:`fastsearch.flow_euler_step` kernel call.

    Same config, outputs and ``step_index`` bookkeeping as diffusers' scheduler for a scalar timestep. Its
    ``step`` also takes ``timestep`` as a float [B] tensor: each timestep is looked up in ``self.timesteps``
    (its first match gives that sample's step index ``i``; a timestep not in the schedule is an error) and
    the sample steps from ``sigmas[i]`` to ``sigmas[i + 1]``. A per-sample step leaves ``step_index`` as it
    was, since there is no single index to advance.

    The kernel computes in fp32. For half-precision samples and model outputs, diffusers rounds
    ``dt * model_output`` to half precision before adding it; the kernel rounds once, at the end, so results
    can differ by that rounding. With ``stochastic_sampling`` the computation is done in fp32 as diffusers
    does it, with the noise drawn exactly as diffusers draws it (``randn_tensor`` with ``generator``).

    Falls back to ``FlowMatchEulerDiscreteScheduler.step`` (the stock result) for ``per_token_timesteps``,
    for dtypes other than float32 / float16 / bfloat16, and for a model output shaped unlike the sample.
    With per-sample timesteps, the fallback runs the stock step once per sample at its own step index.

    Example:
        >>> pipe.scheduler = FastFlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    """

    def _step_indices(self, timesteps: torch.Tensor) -> torch.Tensor:
        schedule = self.timesteps.to(timesteps.device)
        matches = schedule[None, :] == timesteps.to(schedule.dtype)[:, None]
        found = matches.any(dim=1)
        if not bool(found.all()):
            missing = timesteps[~found].tolist()
            raise ValueError(f"timestep values {missing} are not in scheduler.timesteps; per-sample timesteps must "
                             "be taken from scheduler.timesteps")
        return matches.to(torch.int8).argmax(dim=1)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, per_token_timesteps: torch.Tensor | None = None,
             return_dict: bool = True):
        """One flow-matching Euler step, as ``FlowMatchEulerDiscreteScheduler.step``.

        Args:
            model_output: [B, ...] the velocity prediction.
            timestep: a float or 0-d tensor from ``self.timesteps``, or a float [B] tensor of them (per sample).
            sample: [B, ...] float32 / float16 / bfloat16 (others use the stock step).
            s_churn, s_tmin, s_tmax, s_noise: accepted and ignored, as diffusers does.
            generator: draws the noise of ``stochastic_sampling``, as diffusers.
            per_token_timesteps: handled by the stock step (scalar ``timestep`` only).
            return_dict: as diffusers.

        Returns:
            ``FlowMatchEulerDiscreteSchedulerOutput(prev_sample)`` in the model output's dtype, or the tuple
            ``(prev_sample,)`` when ``return_dict=False``.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep must be one of scheduler.timesteps (floats), not an integer index such as one "
                             "from enumerate(timesteps)")
        per_sample = _per_sample_timesteps(timestep, sample)
        if per_token_timesteps is not None:
            if per_sample is not None:
                raise ValueError("per_token_timesteps needs a scalar timestep, not one timestep per sample")
            return super().step(model_output, timestep, sample, generator=generator,
                                per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        if per_sample is None:
            if not _kernel_covers(model_output, sample, same_dtype=False):
                return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
            if self.step_index is None:
                self._init_step_index(timestep)  # private diffusers API, as its own step does
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            prev_sample = self._euler(model_output, sample, sigma, sigma_next, generator)
            self._step_index += 1  # private diffusers attribute: no public setter (see the module docstring)
        else:
            index = self._step_indices(per_sample)
            if not _kernel_covers(model_output, sample, same_dtype=False):
                return self._step_each(model_output, index, sample, generator, return_dict)
            sigmas = self.sigmas.to(sample.device)
            index = index.to(sample.device)
            prev_sample = self._euler(model_output, sample, sigmas[index], sigmas[index + 1], generator)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def _euler(self, model_output, sample, sigma, sigma_next, generator):
        stochastic = bool(self.config.stochastic_sampling)
        if stochastic or sample.dtype != model_output.dtype:
            # diffusers upcasts the sample (and draws its noise) in fp32; casting to fp32 is exact.
            sample, velocity = sample.float(), model_output.float()
        else:
            velocity = model_output
        noise = None
        if stochastic:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev = fastsearch.flow_euler_step(sample, velocity, sigma, sigma_next, noise=noise, stochastic=stochastic)
        return prev.to(model_output.dtype)

    def _step_each(self, model_output, index, sample, generator, return_dict):
        """The stock step once per sample at its own step index (the fallback for per-sample timesteps)."""
        saved = self.step_index
        outputs = []
        try:
            for i in range(sample.shape[0]):
                # the stock step reads its step index from the private attribute: no public setter exists
                self._step_index = int(index[i])
                outputs.append(super().step(model_output[i:i + 1], self.timesteps[int(index[i])],
                                            sample[i:i + 1], generator=generator))
        finally:
            self._step_index = saved
        return _stack_outputs(outputs, FlowMatchEulerDiscreteSchedulerOutput, return_dict)
