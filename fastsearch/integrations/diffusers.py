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
_CANDIDATES, _NEIGHBORS, _RESTARTS = range(3)


class _PipelineRunner:
    """Runs the pipeline on given initial latents, scores its images and counts what it spends.

    While active, the scheduler's ``step`` is wrapped (on the instance; restored on exit) to count the rows
    it steps, which is the NFE count (pipeline steps x images, for any scheduler order or step count), and to
    read the initial latents of a call the pipeline draws itself (the sample of its first step, divided by
    ``init_noise_sigma``).
    """

    def __init__(self, pipe, verifier: Callable, verifier_kwargs: dict, pipe_kwargs: dict):
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.verifier = verifier
        self.verifier_kwargs = verifier_kwargs
        self.pipe_kwargs = pipe_kwargs
        self.total_nfe = 0
        self.verifier_calls = 0
        self.images_per_call = None
        self._rows = 0
        self._first_sample = None

    def __enter__(self) -> _PipelineRunner:
        stock_step = self.scheduler.step
        self._shadowed = self.scheduler.__dict__.get("step")

        def counted_step(*args, **kwargs):
            sample = kwargs["sample"] if "sample" in kwargs else args[2]
            if self._first_sample is None:
                self._first_sample = sample
            self._rows += sample.shape[0]
            return stock_step(*args, **kwargs)

        self.scheduler.step = counted_step
        return self

    def __exit__(self, *exc_info) -> None:
        if self._shadowed is None:
            del self.scheduler.step
        else:
            self.scheduler.step = self._shadowed

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
        scores = self.verifier(images, **self.verifier_kwargs)
        if not isinstance(scores, torch.Tensor) or scores.shape != images.shape[:1]:
            raise ValueError(f"verifier must return one score per image, a tensor of shape [{images.shape[0]}], got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        self.total_nfe += self._rows
        self.verifier_calls += images.shape[0]
        return images, scores.detach().float(), latents, self._rows // self.images_per_call

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


def search_pipeline(pipe, verifier: Callable, algorithm: str = "random", *, num_candidates: int | None = None,
                    num_neighbors: int = 4, iterations: int | None = None, cos_sim: float = 0.95,
                    budget_nfe: int | None = None, seed: int | None = None, verifier_kwargs: dict | None = None,
                    progress: bool = True, **pipe_kwargs):
    """Search over initial noises through a diffusers pipeline that takes ``latents=``.

    Every pipeline call makes the same B images (whatever ``pipe_kwargs`` ask for: a batch, prompts x
    images per prompt) from initial latents chosen by the search; each of the B image slots is searched
    independently. The first call uses the latents the pipeline draws itself (so candidate 0 is exactly the
    unsearched pipeline output); later latents come from fastsearch's Philox stream under ``seed``.

    - ``"random"``: random search (best-of-N over initial noises, Ma et al. 2025), N calls.
    - ``"zero_order"``: zero-order search, as :func:`fastsearch.diffusion.zero_order_search`: each round calls
      the pipeline on the pivot and on ``num_neighbors`` neighbours at cosine ``cos_sim`` with the same norm
      (:func:`fastsearch.zo_neighbors`); the best neighbour becomes the pivot if it beats the pivot, else the
      next round restarts from fresh noise.
    - ``"paths"`` and ``"fk"`` are not run here: they re-noise and branch intermediate latents and score x0
      predictions mid-trajectory, which needs the denoiser and a decoder, not a whole pipeline call. Run
      :func:`fastsearch.diffusion.paths_search` / :func:`~fastsearch.diffusion.fk_steering` with the pipeline's
      denoiser and ``DDIMSampler.from_diffusers(pipe.scheduler)`` instead.

    NFEs are counted as pipeline steps x images (the rows the scheduler steps, so classifier-free guidance's
    doubled batch counts once, as diffusers' step count does). While searching, ``pipe.scheduler.step`` is
    wrapped to count them and restored afterwards. The step count is measured on the first call, so a
    ``budget_nfe`` smaller than one call is reported after that call.

    Args:
        pipe: a diffusers pipeline whose ``__call__`` takes ``latents=``.
        verifier: ``verifier(images, **verifier_kwargs) -> [B]`` scores, higher is better, where ``images`` is
            what the pipeline returns as a tensor (numpy images are converted as they are).
        algorithm: ``"random"`` or ``"zero_order"`` (``"paths"``, ``"fk"``: NotImplementedError, see above).
        num_candidates: N >= 1 pipeline calls (random search).
        num_neighbors: K >= 1 neighbours per round (zero-order search).
        iterations: rounds of zero-order search (each K + 1 calls).
        cos_sim: neighbours' cosine similarity with the pivot, in [-1, 1].
        budget_nfe: NFEs per image instead of ``num_candidates`` / ``iterations``: the most that fit.
        seed: int seed of the search's latents (None: drawn from torch's generator). The pipeline's own
            randomness (its first latents, DDIM eta noise) follows its ``generator`` argument.
        verifier_kwargs: keyword arguments for every verifier call (e.g. per-image labels).
        progress: show a tqdm bar of pipeline calls.
        **pipe_kwargs: the pipeline's arguments (``output_type`` defaults to ``"pt"`` where it exists).

    Returns:
        :class:`fastsearch.diffusion.SearchResult` with ``sample`` [B, ...] the best images, ``score`` [B],
        ``scores`` [B, calls] every call's scores, ``nfe`` per image, ``total_nfe``, ``verifier_calls``,
        ``noise`` [B, ...] the initial latents of each best image, and ``history`` one entry per call
        (random: ``{"round", "nfe", "best_score"}``) or per round (zero-order: also ``"round_best"``,
        ``"moved"``, ``"restarted"``).

    Example:
        >>> result = search_pipeline(pipe, clip_score, "random", num_candidates=8, prompt=["a red fox"] * 2,
        ...                          verifier_kwargs={"prompts": ["a red fox"] * 2})
        >>> result.sample.shape, result.nfe                 # 2 best images, 8 x 50 NFEs per image
    """
    if algorithm in ("paths", "fk"):
        raise NotImplementedError(f"search_pipeline does not run algorithm={algorithm!r}: it needs intermediate "
                                  "latents, x0 predictions and a decoder, which a pipeline call does not expose; use "
                                  "fastsearch.diffusion with the pipeline's denoiser and a sampler built by "
                                  "DDIMSampler.from_diffusers(pipe.scheduler)")
    if algorithm not in PIPELINE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(PIPELINE_ALGORITHMS)}, got {algorithm!r}")
    if not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    parameters = inspect.signature(pipe).parameters
    if "latents" not in parameters:
        raise ValueError(f"pipe ({type(pipe).__name__}) does not take latents=; search_pipeline needs a pipeline "
                         "whose __call__ accepts initial latents")
    if "latents" in pipe_kwargs:
        raise ValueError("latents are chosen by the search; do not pass latents= in pipe_kwargs")
    if not callable(verifier):
        raise TypeError(f"verifier must be callable, got {type(verifier).__name__}")
    count = _count_arg("num_candidates" if algorithm == "random" else "iterations",
                       num_candidates if algorithm == "random" else iterations, budget_nfe)
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be a positive int, got {num_neighbors!r}")
    if not -1.0 <= cos_sim <= 1.0:
        raise ValueError(f"cos_sim must be in [-1, 1], got {cos_sim}")
    if "output_type" in parameters and "output_type" not in pipe_kwargs:
        pipe_kwargs["output_type"] = "pt"
    seed = fresh_seed() if seed is None else seed_arg(seed)
    history, all_scores = [], []
    with _PipelineRunner(pipe, verifier, dict(verifier_kwargs or {}), pipe_kwargs) as run, \
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
