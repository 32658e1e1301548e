"""diffusers drop-ins: schedulers whose ``step`` is one fused kernel, and noise search through a pipeline.

- :class:`FastDDIMScheduler` and :class:`FastFlowMatchEulerDiscreteScheduler` subclass diffusers'
  ``DDIMScheduler`` and ``FlowMatchEulerDiscreteScheduler``: same config (``from_config`` works both
  ways), same outputs, and ``step`` also takes a [B] tensor of per-sample timesteps.
- :func:`search_pipeline` runs a noise search through any pipeline that takes ``latents=``.

Needs the ``diffusers`` extra.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

import fastsearch
from fastsearch.diffusion import SearchResult
from fastsearch.diffusion.samplers import derive_seed
from fastsearch.diffusion.search import _ParticleWeights, _path_schedule
from fastsearch.ops._common import fresh_seed, seed_arg

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
            and sample.dtype in _KERNEL_DTYPES and model_output.dtype in _KERNEL_DTYPES
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
                self._init_step_index(timestep)
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            prev_sample = self._euler(model_output, sample, sigma, sigma_next, generator)
            self._step_index += 1
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
        saved = self._step_index
        outputs = []
        try:
            for i in range(sample.shape[0]):
                self._step_index = int(index[i])
                outputs.append(super().step(model_output[i:i + 1], self.timesteps[self._step_index],
                                            sample[i:i + 1], generator=generator))
        finally:
            self._step_index = saved
        return _stack_outputs(outputs, FlowMatchEulerDiscreteSchedulerOutput, return_dict)


# -- search through a pipeline ------------------------------------------------------------------------------------


PIPELINE_ALGORITHMS = ("random", "zero_order", "paths", "fk")
# stream names under the search seed
_CANDIDATES, _NEIGHBORS, _RESTARTS, _RENOISE, _STEP_NOISE, _RESAMPLE = range(6)


class _PipelineRunner:
    """Runs the pipeline, scores its images and counts what it spends.

    While active, the scheduler's ``step`` is wrapped (on the instance; restored on exit) to count the rows
    it steps, which is the NFE count (pipeline steps x images, for any scheduler order or step count), and to
    read the initial latents of a call the pipeline draws itself (the sample of its first step, divided by
    ``init_noise_sigma``). With a ``driver`` (search over paths, FK steering), ``set_timesteps`` and ``step``
    are handed to it, so that it steers the call step by step.
    """

    def __init__(self, pipe, verifier: Callable, verifier_kwargs: dict, pipe_kwargs: dict, driver=None,
                 rows_per_image: int = 1):
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.verifier = verifier
        self.verifier_kwargs = verifier_kwargs
        self.rows_per_image = rows_per_image  # paths / fk: each image slot's rows, which share its arguments
        self._row_kwargs = {}
        self.pipe_kwargs = pipe_kwargs
        self.driver = driver
        if driver is not None:
            driver.runner = self
        self.total_nfe = 0
        self.verifier_calls = 0
        self.images_per_call = None
        self._rows = 0
        self._first_sample = None

    def __enter__(self) -> _PipelineRunner:
        stock_step = self.scheduler.step
        self._shadowed = {name: self.scheduler.__dict__.get(name) for name in ("step", "set_timesteps")}

        def counted_step(*args, **kwargs):
            sample = kwargs["sample"] if "sample" in kwargs else args[2]
            if self._first_sample is None:
                self._first_sample = sample
            self._rows += sample.shape[0]
            if self.driver is not None:
                return self.driver.step(stock_step, args, kwargs)
            return stock_step(*args, **kwargs)

        self.scheduler.step = counted_step
        if self.driver is not None:
            stock_set_timesteps = self.scheduler.set_timesteps
            self.scheduler.set_timesteps = (
                lambda *args, **kwargs: self.driver.set_timesteps(stock_set_timesteps, args, kwargs))
        return self

    def __exit__(self, *exc_info) -> None:
        for name, shadowed in self._shadowed.items():
            if shadowed is not None:
                setattr(self.scheduler, name, shadowed)
            elif name in self.scheduler.__dict__:
                delattr(self.scheduler, name)
        if self.driver is not None:
            self.driver.restore()

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Verifier scores of ``images`` (final, or decoded mid-trajectory): [B] float32."""
        kwargs = self.verifier_kwargs
        if self.rows_per_image > 1:
            rows = images.shape[0]
            if rows not in self._row_kwargs:
                self._row_kwargs[rows] = {name: _expand_per_image(value, rows // self.rows_per_image,
                                                                  self.rows_per_image)
                                          for name, value in kwargs.items()}
            kwargs = self._row_kwargs[rows]
        scores = self.verifier(images, **kwargs)
        if not isinstance(scores, torch.Tensor) or scores.shape != images.shape[:1]:
            raise ValueError(f"verifier must return one score per image, a tensor of shape [{images.shape[0]}], got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        self.verifier_calls += images.shape[0]
        return scores.detach().float()

    def __call__(self, latents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One pipeline call. Returns ``(images [B, ...], scores [B] float32, initial latents, NFEs per image)``."""
        self._rows, self._first_sample = 0, None
        kwargs = self.pipe_kwargs if latents is None else {**self.pipe_kwargs, "latents": latents}
        output = self.pipe(**kwargs)
        images = output.images if hasattr(output, "images") else output[0]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"the pipeline returned images as {type(images).__name__}; search_pipeline scores "
                            "tensors: pass output_type='pt' (or 'np')")
        if self._first_sample is None:
            raise ValueError("the pipeline ran without calling its scheduler's step; nothing to search over")
        if latents is None:
            latents = self._first_sample / self.scheduler.init_noise_sigma
        if self.images_per_call is None:
            self.images_per_call = images.shape[0]
        if images.shape[0] != self.images_per_call or self._rows % self.images_per_call:
            raise ValueError(f"the pipeline returned {images.shape[0]} images and stepped {self._rows} latent rows; "
                             f"every call must make the same {self.images_per_call} images")
        self.total_nfe += self._rows
        scores = self.score(images)
        return images, scores, latents, self._rows // self.images_per_call

    @property
    def nfe(self) -> int:
        """NFEs spent per image so far."""
        return self.total_nfe // (self.images_per_call or 1)


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores rank below all others (a NaN is never the best)."""
    return torch.nan_to_num(scores, nan=-math.inf)


def _rows_where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(a.device).reshape((-1,) + (1,) * (a.dim() - 1)), a, b)


class _Best:
    """The best image, score and initial latents per image slot so far (the earlier one wins ties)."""

    def __init__(self, images: torch.Tensor, scores: torch.Tensor, latents: torch.Tensor):
        self.images, self.score, self.latents = images, scores, latents

    def offer(self, images: torch.Tensor, scores: torch.Tensor, latents: torch.Tensor) -> None:
        better = _ranked(scores) > _ranked(self.score)
        self.images = _rows_where(better, images, self.images)
        self.latents = _rows_where(better, latents, self.latents)
        self.score = torch.where(better, scores, self.score)


def _count_arg(name: str, count, budget_nfe):
    """Check that exactly one of a count and ``budget_nfe`` is given, each a positive int."""
    if (count is None) == (budget_nfe is None):
        raise ValueError(f"give exactly one of {name} and budget_nfe")
    for label, value in ((name, count), ("budget_nfe", budget_nfe)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    return count


def _count_within(budget_nfe: int, cost: int, unit: str) -> int:
    """The most units of ``cost`` NFEs per image that fit into the budget."""
    if budget_nfe < cost:
        raise ValueError(f"budget_nfe={budget_nfe} is smaller than one {unit} ({cost} NFEs per image)")
    return budget_nfe // cost


# -- steering a pipeline call step by step (search over paths, FK steering) ------------------------------------


def _scheduler_family(scheduler, algorithm: str) -> str:
    """``"ddim"``, ``"ddpm"`` or ``"flow"``: the schedulers a driven search knows how to re-noise and steer."""
    from diffusers import DDPMScheduler

    for family, kind in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler), ("flow", FlowMatchEulerDiscreteScheduler)):
        if isinstance(scheduler, kind):
            return family
    raise ValueError(f"search_pipeline(algorithm={algorithm!r}) steers the scheduler step by step and supports "
                     f"DDIMScheduler, DDPMScheduler and FlowMatchEulerDiscreteScheduler (and their subclasses, such as "
                     f"FastDDIMScheduler); the pipeline's scheduler is a {type(scheduler).__name__}. Swap one in, e.g. "
                     "pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)")


def default_decoder(pipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a pipeline does to its final latents to make ``output_type="pt"`` images, as a function.

    Known layouts: a ``movq`` decoder (Kandinsky 2.2: its raw decode, which is what that pipeline returns as
    ``"pt"``) and a ``vae`` with an ``image_processor`` (Stable Diffusion and kin: ``latents / scaling_factor``
    (``+ shift_factor``), decode, ``postprocess(output_type="pt")``). A pipeline without either raises: pass
    ``decode=`` to :func:`search_pipeline`. Either way, search_pipeline checks the decoder against the images
    of the pipeline call.
    """
    if getattr(pipe, "movq", None) is not None:
        return lambda latents: pipe.movq.decode(latents, force_not_quantize=True).sample
    vae, processor = getattr(pipe, "vae", None), getattr(pipe, "image_processor", None)
    if vae is not None and processor is not None and hasattr(vae.config, "scaling_factor"):
        def decode(latents: torch.Tensor) -> torch.Tensor:
            latents = latents.to(vae.dtype) / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:
                latents = latents + vae.config.shift_factor
            return processor.postprocess(vae.decode(latents).sample, output_type="pt")
        return decode
    raise ValueError(f"no default decoder for a {type(pipe).__name__} (it has neither movq nor vae + image_processor): "
                     "pass decode=, a function from latents to the images the pipeline returns")


def _check_decoder(decode: Callable, latents: torch.Tensor, images: torch.Tensor, default: bool) -> None:
    """The images a search scored mid-trajectory must be what the pipeline makes of latents."""
    decoded = decode(latents)
    if not isinstance(decoded, torch.Tensor) or decoded.shape != images.shape:
        raise ValueError(f"decode(latents) must give images shaped like the pipeline's output {list(images.shape)}, "
                         f"got {list(getattr(decoded, 'shape', [])) or type(decoded).__name__}")
    if default:
        expected = images.to(decoded.device, torch.float32)
        error = (decoded.float() - expected).abs().max().item()
        if not error <= 1e-3 * max(1.0, expected.abs().max().item()):
            raise ValueError(f"the default decoder does not reproduce this pipeline's output images (max difference "
                             f"{error:.3g}), so the mid-trajectory scores would not be of the same images: pass "
                             "decode=, a function from latents to the images the pipeline returns")


def _expand_per_image(value, images: int, factor: int):
    """A per-image verifier argument (a tensor or list of ``images`` entries) for ``factor`` rows per image."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == images:
        return value.repeat_interleave(factor, dim=0)
    if isinstance(value, list | tuple) and len(value) == images:
        return type(value)(item for item in value for _ in range(factor))
    return value


def _multiply_images(parameters, pipe_kwargs: dict, factor: int, algorithm: str) -> dict:
    """``pipe_kwargs`` asking for ``factor`` times the images, each image's rows consecutive (prompt-major)."""
    for name in ("num_images_per_prompt", "batch_size"):
        if name in parameters:
            default = parameters[name].default
            current = pipe_kwargs.get(name, default if isinstance(default, int) else 1)
            return {**pipe_kwargs, name: current * factor}
    raise ValueError(f"search_pipeline(algorithm={algorithm!r}) runs all paths / particles in one pipeline call and "
                     "needs a pipeline that takes num_images_per_prompt= or batch_size=")


class _Driver:
    """Steers one pipeline call: replaces the scheduler's timesteps by a plan of states (which may go back to
    noisier states) and, after each step, lets the search replace the latents.

    ``search.plan(N) -> [states]`` gives the state (index into the stock N timesteps) of each model evaluation
    in order; ``search.after_step(position, state, prev_sample, x0) -> latents`` sees each step's output and
    returns the latents for the next evaluation (re-noised, resampled or unchanged). The stock ``step`` does
    every step: the driver only sets the state it steps from (``_step_index`` of flow schedulers; stateless
    DDIM / DDPM read the timestep) and, for FK steering with DDIM, its ``eta`` and noise.
    """

    def __init__(self, scheduler, family: str, search, *, eta: float | None, seed: int, bar):
        self.scheduler, self.family, self.search = scheduler, family, search
        self.eta, self.seed = eta, seed
        self.bar = bar
        self.runner = None  # the _PipelineRunner of the call, which sets it
        self.plan = None
        self.position = 0
        self.final_latents = None
        self._step_signature = None

    # -- hooks ---------------------------------------------------------------------------------------------------

    def set_timesteps(self, stock_set_timesteps, args, kwargs) -> None:
        stock_set_timesteps(*args, **kwargs)
        scheduler = self.scheduler
        self.stock_timesteps = scheduler.timesteps
        steps = len(self.stock_timesteps)
        self.plan = list(self.search.plan(steps))
        self.plan_timesteps = self.stock_timesteps[torch.tensor(self.plan, device=self.stock_timesteps.device)]
        if self.family == "flow":
            self.sigmas = scheduler.sigmas.detach().float().cpu()
        self.position = 0
        # what the pipeline reads back and loops over
        scheduler.timesteps = self.plan_timesteps
        if self.bar is not None:
            self.bar.reset(total=len(self.plan))

    def step(self, stock_step, args, kwargs):
        if self.plan is None:
            raise RuntimeError("the pipeline stepped its scheduler before calling set_timesteps")
        if self._step_signature is None:
            self._step_signature = inspect.signature(stock_step)
        arguments = self._step_signature.bind(*args, **kwargs).arguments
        model_output, timestep, sample = arguments["model_output"], arguments["timestep"], arguments["sample"]
        if self.position >= len(self.plan):
            raise RuntimeError(f"the pipeline stepped more than the {len(self.plan)} planned times")
        state = self.plan[self.position]
        expected = self.stock_timesteps[state]
        if torch.as_tensor(timestep).reshape(-1).to(expected.device, expected.dtype).ne(expected).any():
            raise ValueError(f"the pipeline stepped timestep {timestep} where the search planned {expected.item()}: a "
                             "driven search (paths, fk) needs the pipeline to run every timestep it is given, in "
                             "order (img2img strength and denoising_start / denoising_end are not supported)")
        return_dict = arguments.pop("return_dict", True)
        if self.eta is not None:  # FK steering with DDIM: stochastic steps from the search's stream
            arguments["eta"] = self.eta
            arguments["generator"] = None
            arguments["variance_noise"] = fastsearch.randn(
                model_output.shape, seed=derive_seed(self.seed, _STEP_NOISE, self.position), device=model_output.device,
                dtype=model_output.dtype)
        scheduler = self.scheduler
        if self.family == "flow":
            scheduler._step_index = state
        scheduler.timesteps = self.stock_timesteps  # DDPM finds the previous timestep in it
        try:
            output = stock_step(**arguments, return_dict=True)
        finally:
            scheduler.timesteps = self.plan_timesteps
        x0 = getattr(output, "pred_original_sample", None)
        if x0 is None:  # flow matching: x0 = x - sigma v
            x0 = (sample.float() - float(self.sigmas[state]) * model_output.float()).to(output.prev_sample.dtype)
        latents = self.search.after_step(self, self.position, state, output.prev_sample, x0)
        self.position += 1
        if self.position == len(self.plan):
            self.final_latents = latents
        if self.bar is not None:
            self.bar.update()
        output.prev_sample = latents
        return output if return_dict else output.to_tuple()

    def restore(self) -> None:
        if self.plan is not None and self.scheduler.timesteps is self.plan_timesteps:
            self.scheduler.timesteps = self.stock_timesteps

    # -- what the searches use -------------------------------------------------------------------------------

    def level_after(self, state: int) -> float:
        """The re-noising level (alpha_prod or sigma) of the sample that the step from ``state`` returns."""
        scheduler = self.scheduler
        if self.family == "flow":
            return float(self.sigmas[state + 1])
        t = int(self.stock_timesteps[state])
        if self.family == "ddim":
            prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            final = scheduler.final_alpha_cumprod
        else:
            saved, scheduler.timesteps = scheduler.timesteps, self.stock_timesteps
            try:
                prev = int(scheduler.previous_timestep(t))
            finally:
                scheduler.timesteps = saved
            final = scheduler.one
        return float(scheduler.alphas_cumprod[prev] if prev >= 0 else final)

    def level_at(self, state: int) -> float:
        """The level at which the model evaluates ``state``."""
        if self.family == "flow":
            return float(self.sigmas[state])
        return float(self.scheduler.alphas_cumprod[int(self.stock_timesteps[state])])

    def renoise(self, latents: torch.Tensor, after: int, to: int, seed: int) -> torch.Tensor:
        """Re-noise the output of the step from state ``after`` to the level of state ``to`` (exact marginal)."""
        out = fastsearch.renoise(latents.float(), self.level_after(after), self.level_at(to),
                                 schedule="flow" if self.family == "flow" else "vp", seed=seed)
        return out.to(latents.dtype)

    def score_latents(self, decode: Callable, latents: torch.Tensor) -> torch.Tensor:
        """Verifier scores of decoded latents (x0 predictions mid-trajectory): [rows] float32."""
        return self.runner.score(decode(latents))


def _path_plan(steps: int, options: tuple) -> tuple[list[int], dict[int, int], list[tuple[int, int, int]]]:
    """Search over paths as one pipeline call: the state of each model evaluation, the positions after which a
    selection and re-noising follow (position -> the round it starts), and the rounds."""
    start, rounds = _path_schedule(steps, *options)
    states = list(range(start))
    ends = {len(states) - 1: 0}
    for index, (_, renoised, following) in enumerate(rounds):
        states.extend(range(renoised, following))
        if following < steps:
            ends[len(states) - 1] = index + 1
    return states, ends, rounds


class _PathsInPipeline:
    """Search over paths inside one pipeline call of slots x n x M rows (see :func:`search_pipeline`)."""

    def __init__(self, paths: int, branches: int, options: tuple, decode: Callable):
        self.paths, self.branches, self.options = paths, branches, options
        self.decode = decode
        self.history = []

    def plan(self, steps: int) -> list[int]:
        self.steps = steps
        states, self.ends, self.rounds = _path_plan(steps, self.options)
        return states

    def after_step(self, driver: _Driver, position: int, state: int, latents: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
        if position not in self.ends:
            return latents
        width = self.paths * self.branches
        scores = driver.score_latents(self.decode, x0).view(-1, width)
        local = fastsearch.segmented_topk(_ranked(scores), self.paths)[1]
        keep = (local + torch.arange(scores.shape[0], device=local.device)[:, None] * width).flatten()
        next_round = self.ends[position]
        renoised = self.rounds[next_round][1]
        self.history.append({"round": next_round - 1, "state": state + 1, "nfe": driver.runner._rows // scores.shape[0],
                             "best_score": scores.flatten()[keep.view(-1, self.paths)[:, 0]], "scores": scores})
        kept = latents[keep.to(latents.device)].repeat_interleave(self.branches, dim=0)
        return driver.renoise(kept, state, renoised, derive_seed(driver.seed, _RENOISE, next_round))


class _FKInPipeline:
    """FK steering inside one pipeline call of slots x n rows (see :func:`search_pipeline`)."""

    def __init__(self, particles: int, potential: str, lam: float, every: int | None, ess_threshold: float,
                 decode: Callable):
        self.particles, self.potential, self.lam = particles, potential, lam
        self.every, self.ess_threshold = every, ess_threshold
        self.decode = decode
        self.weights = None
        self.history = []

    def plan(self, steps: int) -> list[int]:
        self.steps = steps
        if self.every is None:
            self.every = max(1, steps // 10)
        return list(range(steps))

    def _weights(self, rows: int, device) -> _ParticleWeights:
        if self.weights is None:
            self.weights = _ParticleWeights(rows // self.particles, self.particles, self.potential, self.lam,
                                            self.ess_threshold, device)
        return self.weights

    def after_step(self, driver: _Driver, position: int, state: int, latents: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
        if state == self.steps - 1 or (state + 1) % self.every:
            return latents
        scores = driver.score_latents(self.decode, x0)
        weights = self._weights(latents.shape[0], scores.device)
        entry = weights.update(scores, step=state, nfe=driver.runner._rows // weights.num_prompts, final=False)
        ancestors = weights.resample(entry, seed=derive_seed(driver.seed, _RESAMPLE, state))
        self.history.append(entry)
        return latents if ancestors is None else latents[ancestors.to(latents.device)]

    def finish(self, scores: torch.Tensor, nfe: int) -> None:
        weights = self._weights(scores.shape[0], scores.device)
        self.history.append(weights.update(scores, step=self.steps - 1, nfe=nfe, final=True))


def _inference_steps(parameters, pipe_kwargs: dict) -> int | None:
    """The pipeline's step count when it can be read off its arguments (else None)."""
    if "num_inference_steps" not in parameters:
        return None
    value = pipe_kwargs.get("num_inference_steps", parameters["num_inference_steps"].default)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _driven_search(pipe, verifier, algorithm: str, parameters, pipe_kwargs: dict, verifier_kwargs: dict, *,
                   count, budget_nfe, seed: int, decode, progress: bool, paths_options: dict,
                   fk_options: dict) -> SearchResult:
    """Search over paths or FK steering: one pipeline call of slots x (n M or n) rows, steered step by step."""
    family = _scheduler_family(pipe.scheduler, algorithm)
    name = "num_paths" if algorithm == "paths" else "num_particles"
    _count_arg(name, count, budget_nfe)
    eta = None
    if algorithm == "fk":
        _ParticleWeights.check_options(fk_options["potential"], fk_options["lam"], fk_options["ess_threshold"])
        every = fk_options["resample_every"]
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"resample_every must be a positive int, got {every!r}")
        if family == "ddim":
            eta = fk_options["eta"]
            if not eta > 0:
                raise ValueError(f"fk steering needs stochastic steps: eta must be > 0 with a DDIM scheduler, "
                                 f"got {eta}")
        elif family == "flow" and not pipe.scheduler.config.get("stochastic_sampling", False):
            raise ValueError("fk steering needs stochastic steps: the flow-matching scheduler is deterministic; use "
                             "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                             "stochastic_sampling=True)")
    else:
        branches = paths_options["branches"]
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"branches must be a positive int, got {branches!r}")
    steps = _inference_steps(parameters, pipe_kwargs)
    options = (paths_options["start_level"], paths_options["forward_interval"], paths_options["backward_interval"])
    if steps is not None and algorithm == "paths":
        _path_schedule(steps, *options)  # bad options fail before anything runs
    if count is None:
        if steps is None:
            raise ValueError(f"budget_nfe needs the pipeline's num_inference_steps to price one {name[4:-1]}; "
                             f"give {name} instead")
        if algorithm == "paths":
            plan_length = len(_path_plan(steps, options)[0])
            count = _count_within(budget_nfe, plan_length * branches, "path")
        else:
            count = _count_within(budget_nfe, steps, "particle")
    if decode is None:
        decoder, default = default_decoder(pipe), True
    elif callable(decode):
        decoder, default = decode, False
    else:
        raise TypeError(f"decode must be callable, got {type(decode).__name__}")
    if isinstance(pipe_kwargs.get("generator"), list):
        raise ValueError(f"search_pipeline(algorithm={algorithm!r}) multiplies the pipeline's images: pass one "
                         "torch.Generator, not a list")
    if algorithm == "paths":
        factor = count * branches
        search = _PathsInPipeline(count, branches, options, decoder)
    else:
        factor = count
        search = _FKInPipeline(count, fk_options["potential"], fk_options["lam"], fk_options["resample_every"],
                               fk_options["ess_threshold"], decoder)
    kwargs = _multiply_images(parameters, pipe_kwargs, factor, algorithm)
    with tqdm(desc=f"search_pipeline[{algorithm}]", unit="step", disable=not progress) as bar, torch.no_grad():
        driver = _Driver(pipe.scheduler, family, search, eta=eta, seed=seed, bar=bar)
        with _PipelineRunner(pipe, verifier, verifier_kwargs, kwargs, driver, rows_per_image=factor) as run:
            images, scores, _, _ = run(None)
        if images.shape[0] % factor:
            raise ValueError(f"the pipeline made {images.shape[0]} images, not a multiple of the {factor} rows per "
                             "image slot the search asked for")
        if driver.final_latents is None or driver.final_latents.shape[0] != images.shape[0]:
            raise ValueError("the pipeline's images do not come from the latents of its last scheduler step")
        _check_decoder(decoder, driver.final_latents, images, default)
    slots = images.shape[0] // factor
    nfe_per_slot = run.total_nfe // slots
    grouped = scores.view(slots, factor)
    best = fastsearch.segmented_topk(_ranked(grouped), 1)[1][:, 0] + torch.arange(slots) * factor
    if algorithm == "paths":
        rounds = len(search.rounds)
        search.history.append({"round": rounds - 1, "state": search.steps, "nfe": nfe_per_slot,
                               "best_score": scores[best], "scores": grouped})
    else:
        search.finish(scores, nfe_per_slot)
    return SearchResult(sample=images[best.to(images.device)], score=scores[best], scores=grouped, nfe=nfe_per_slot,
                        total_nfe=run.total_nfe, verifier_calls=run.verifier_calls, history=search.history)


def search_pipeline(pipe, verifier: Callable, algorithm: str = "random", *, num_candidates: int | None = None,
                    num_neighbors: int = 4, iterations: int | None = None, cos_sim: float = 0.95,
                    num_paths: int | None = None, branches: int = 4, start_level: int | None = None,
                    forward_interval: int | None = None, backward_interval: int | None = None,
                    num_particles: int | None = None, potential: str = "max", lam: float = 1.0,
                    resample_every: int | None = None, ess_threshold: float = 0.5, eta: float = 1.0,
                    decode: Callable | None = None, budget_nfe: int | None = None, seed: int | None = None,
                    verifier_kwargs: dict | None = None, progress: bool = True, **pipe_kwargs):
    """Noise search through a diffusers pipeline: over initial latents, over paths, or over particles.

    Each of the B images a plain call of the pipeline makes (whatever ``pipe_kwargs`` ask for: a batch, prompts
    x images per prompt) is an image slot, searched independently.

    Searches over initial noises call the pipeline once per candidate, on latents chosen by the search (any
    pipeline that takes ``latents=``). The first call uses the latents the pipeline draws itself (so candidate 0
    is exactly the unsearched pipeline output); later latents come from fastsearch's Philox stream under ``seed``.

    - ``"random"``: random search (best-of-N over initial noises, Ma et al. 2025), N calls.
    - ``"zero_order"``: zero-order search, as :func:`fastsearch.diffusion.zero_order_search`: each round calls
      the pipeline on the pivot and on ``num_neighbors`` neighbours at cosine ``cos_sim`` with the same norm
      (:func:`fastsearch.zo_neighbors`); the best neighbour becomes the pivot if it beats the pivot, else the
      next round restarts from fresh noise.

    Searches over paths and particles run in one pipeline call that makes every path or particle of every slot
    (``num_images_per_prompt`` or ``batch_size`` is multiplied, so each slot's rows are consecutive and share its
    conditioning). The scheduler is steered step by step: its timesteps are replaced by the search's plan, which
    may return to noisier states, and after each step the search may replace the latents. Supported schedulers:
    DDIM, DDPM and flow-matching Euler (and subclasses such as :class:`FastDDIMScheduler`). x0 predictions are
    scored mid-trajectory through ``decode`` (latents to the images the pipeline returns; by default
    :func:`default_decoder`, checked against the call's output images, an error if it does not reproduce them).

    - ``"paths"``: search over paths, as :func:`fastsearch.diffusion.paths_search` with n = ``num_paths`` and
      M = ``branches``, with one difference: the call's batch is fixed at n x M rows per slot, so the first
      stretch (states 0 to ``start_level``) denoises n x M fresh noises and keeps the best n of them (scored on
      their x0 predictions) before the first branching, where paths_search denoises n.
    - ``"fk"``: FK steering, as :func:`fastsearch.diffusion.fk_steering` with n = ``num_particles``. It needs
      stochastic steps: DDIM steps run with ``eta`` (default 1; their noise comes from the search's stream), DDPM
      is stochastic, and a flow-matching scheduler must have ``stochastic_sampling=True``.

    NFEs are counted as pipeline steps x images (the rows the scheduler steps, so classifier-free guidance's
    doubled batch counts once, as diffusers' step count does) and reported per slot. While searching, the
    scheduler's ``step`` (and for paths / fk its ``set_timesteps``) is wrapped and restored afterwards.

    Args:
        pipe: a diffusers pipeline (taking ``latents=`` for random / zero-order search).
        verifier: ``verifier(images, **verifier_kwargs) -> [B]`` scores, higher is better, where ``images`` is
            what the pipeline returns as a tensor (numpy images are converted as they are).
        algorithm: ``"random"``, ``"zero_order"``, ``"paths"`` or ``"fk"``.
        num_candidates: N >= 1 pipeline calls (random search).
        num_neighbors: K >= 1 neighbours per round (zero-order search).
        iterations: rounds of zero-order search (each K + 1 calls).
        cos_sim: neighbours' cosine similarity with the pivot, in [-1, 1].
        num_paths, branches, start_level, forward_interval, backward_interval: search over paths, as
            :func:`fastsearch.diffusion.paths_search` (states are indices into the pipeline's N timesteps).
        num_particles, potential, lam, resample_every, ess_threshold: FK steering, as
            :func:`fastsearch.diffusion.fk_steering`.
        eta: DDIM stochasticity of FK steering's steps (> 0).
        decode: paths / fk: ``decode(latents) -> images`` like the pipeline's output.
        budget_nfe: NFEs per image slot instead of the count (``num_candidates``, ``iterations``, ``num_paths``,
            ``num_particles``): the most that fit. Paths and fk price it from ``num_inference_steps``.
        seed: int seed of the search's randomness (None: drawn from torch's generator). The pipeline's own
            randomness (its first latents, DDPM and flow step noise) follows its ``generator`` argument.
        verifier_kwargs: keyword arguments for every verifier call (e.g. per-image labels; for paths / fk a
            tensor or list with one entry per slot is repeated for each of the slot's rows).
        progress: show a tqdm bar of pipeline calls (paths / fk: of steps).
        **pipe_kwargs: the pipeline's arguments (``output_type`` defaults to ``"pt"`` where it exists).

    Returns:
        :class:`fastsearch.diffusion.SearchResult` with ``sample`` [B, ...] the best images, ``score`` [B],
        ``scores`` every final image's scores ([B, calls]; paths [B, n M]; fk [B, n]), ``nfe`` per slot,
        ``total_nfe``, ``verifier_calls`` (mid-trajectory scoring included), ``noise`` [B, ...] the initial latents
        of each best image (random / zero-order; else None), and ``history``: one entry per call (random:
        ``{"round", "nfe", "best_score"}``), per round (zero-order: also ``"round_best"``, ``"moved"``,
        ``"restarted"``), per selection (paths: ``{"round", "state", "nfe", "best_score", "scores"}``, round -1
        being the selection at ``start_level``) or per scoring step (fk: as fk_steering's history).

    Example:
        >>> result = search_pipeline(pipe, clip_score, "random", num_candidates=8, prompt=["a red fox"] * 2,
        ...                          verifier_kwargs={"prompts": ["a red fox"] * 2})
        >>> result.sample.shape, result.nfe                 # 2 best images, 8 x 50 NFEs per image
        >>> result = search_pipeline(pipe, clip_score, "fk", num_particles=4, prompt=["a red fox"] * 2,
        ...                          verifier_kwargs={"prompts": ["a red fox"] * 2})
    """
    if algorithm not in PIPELINE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(PIPELINE_ALGORITHMS)}, got {algorithm!r}")
    if not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    parameters = inspect.signature(pipe).parameters
    if "latents" in pipe_kwargs:
        raise ValueError("latents are chosen by the search; do not pass latents= in pipe_kwargs")
    if not callable(verifier):
        raise TypeError(f"verifier must be callable, got {type(verifier).__name__}")
    if "output_type" in parameters and "output_type" not in pipe_kwargs:
        pipe_kwargs["output_type"] = "pt"
    seed = fresh_seed() if seed is None else seed_arg(seed)
    verifier_kwargs = dict(verifier_kwargs or {})
    if algorithm in ("paths", "fk"):
        return _driven_search(
            pipe, verifier, algorithm, parameters, pipe_kwargs, verifier_kwargs,
            count=num_paths if algorithm == "paths" else num_particles, budget_nfe=budget_nfe, seed=seed,
            decode=decode, progress=progress,
            paths_options={"branches": branches, "start_level": start_level, "forward_interval": forward_interval,
                           "backward_interval": backward_interval},
            fk_options={"potential": potential, "lam": lam, "resample_every": resample_every,
                        "ess_threshold": ess_threshold, "eta": eta})
    if "latents" not in parameters:
        raise ValueError(f"pipe ({type(pipe).__name__}) does not take latents=; search_pipeline needs a pipeline "
                         "whose __call__ accepts initial latents")
    count = _count_arg("num_candidates" if algorithm == "random" else "iterations",
                       num_candidates if algorithm == "random" else iterations, budget_nfe)
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be a positive int, got {num_neighbors!r}")
    if not -1.0 <= cos_sim <= 1.0:
        raise ValueError(f"cos_sim must be in [-1, 1], got {cos_sim}")
    history, all_scores = [], []
    with _PipelineRunner(pipe, verifier, verifier_kwargs, pipe_kwargs) as run, \
            tqdm(desc=f"search_pipeline[{algorithm}]", unit="call", disable=not progress) as bar, torch.no_grad():
        images, scores, latents, cost = run(None)
        bar.update()
        best = _Best(images, scores, latents)

        def fresh(*key: int) -> torch.Tensor:
            return fastsearch.randn(latents.shape, seed=derive_seed(seed, *key), device=latents.device,
                                    dtype=latents.dtype)

        if algorithm == "random":
            if count is None:
                count = _count_within(budget_nfe, cost, "pipeline call")
            bar.total = count
            all_scores.append(scores)
            history.append({"round": 0, "nfe": run.nfe, "best_score": best.score.clone()})
            for candidate in range(1, count):
                images, scores, latents, _ = run(fresh(_CANDIDATES, candidate))
                bar.update()
                best.offer(images, scores, latents)
                all_scores.append(scores)
                history.append({"round": candidate, "nfe": run.nfe, "best_score": best.score.clone()})
        else:
            rounds = count if count is not None else _count_within(budget_nfe, cost * (num_neighbors + 1), "round")
            bar.total = rounds * (num_neighbors + 1)
            pivot = latents
            for round_index in range(rounds):
                if round_index > 0:
                    images, scores, pivot, _ = run(pivot)
                    bar.update()
                    best.offer(images, scores, pivot)
                round_scores, round_latents = [scores], [pivot]
                neighbors = fastsearch.zo_neighbors(pivot, num_neighbors, cos_sim=cos_sim,
                                                    seed=derive_seed(seed, _NEIGHBORS, round_index))
                for k in range(num_neighbors):
                    images, scores, latents, _ = run(neighbors[:, k])
                    bar.update()
                    best.offer(images, scores, latents)
                    round_scores.append(scores)
                    round_latents.append(latents)
                grouped = torch.stack(round_scores, dim=1)
                all_scores.append(grouped)
                winner = fastsearch.segmented_topk(_ranked(grouped), 1)[1][:, 0]
                moved = winner != 0
                history.append({"round": round_index, "nfe": run.nfe, "best_score": best.score.clone(),
                                "round_best": grouped.gather(1, winner[:, None]).squeeze(1), "moved": moved,
                                "restarted": ~moved})
                if round_index + 1 < rounds:
                    rows = torch.arange(len(winner), device=pivot.device)
                    pivot = torch.stack(round_latents, dim=1)[rows, winner.to(pivot.device)]
                    if not bool(moved.all()):
                        pivot = _rows_where(moved, pivot, fresh(_RESTARTS, round_index))
        scores_table = torch.stack(all_scores, dim=1) if algorithm == "random" else torch.cat(all_scores, dim=1)
        return SearchResult(sample=best.images, score=best.score, scores=scores_table, nfe=run.nfe,
                            total_nfe=run.total_nfe, verifier_calls=run.verifier_calls, history=history,
                            noise=best.latents)
