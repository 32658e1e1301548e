"""Search over paths and FK steering through a diffusers pipeline: one call that makes every path or particle,
its scheduler steered step by step.

The :class:`Driver` replaces the scheduler's timesteps by the search's plan (which may go back to noisier states)
and, after each step, lets the search replace the latents: :class:`~fastsearch.diffusion.path_plan.PathPlan`
re-noising for search over paths, :class:`~fastsearch.diffusion.particles.ParticleWeights` resampling for FK
steering, both shared with the tensor-level searches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

import fastsearch
from fastsearch.diffusion.core import NoiseSearchResult, best_index, check_budget, count_within, top_rows
from fastsearch.diffusion.options import FKSteering, PathsSearch
from fastsearch.diffusion.particles import ParticleWeights
from fastsearch.integrations.diffusers.runner import PipelineRunner
from fastsearch.seeding import Stream, derive_seed


def _scheduler_family(scheduler, search: str) -> str:
    """``"ddim"``, ``"ddpm"`` or ``"flow"``: the schedulers a steered search knows how to re-noise and steer."""
    for family, kind in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler), ("flow", FlowMatchEulerDiscreteScheduler)):
        if isinstance(scheduler, kind):
            return family
    raise ValueError(f"search_pipeline(search={search!r}) steers the scheduler step by step and supports "
                     f"DDIMScheduler, DDPMScheduler and FlowMatchEulerDiscreteScheduler (and their subclasses, such as "
                     f"FastDDIMScheduler); the pipeline's scheduler is a {type(scheduler).__name__}. Swap one in, e.g. "
                     "pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)")


def default_decoder(pipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a pipeline does to its final latents to make ``output_type="pt"`` images, as a function.

    Known layouts: a ``movq`` decoder (Kandinsky 2.2: its raw decode, which is what that pipeline returns as
    ``"pt"``) and a ``vae`` with an ``image_processor`` (Stable Diffusion and kin: ``latents / scaling_factor``
    (``+ shift_factor``), decode, ``postprocess(output_type="pt")``). A pipeline without either raises: pass
    ``decode=`` to :func:`~fastsearch.integrations.diffusers.search_pipeline`. Either way, search_pipeline checks
    the decoder against the images of the pipeline call.
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


def _multiply_images(parameters, pipe_kwargs: dict, factor: int, search: str) -> dict:
    """``pipe_kwargs`` asking for ``factor`` times the images, each image's rows consecutive (prompt-major)."""
    for name in ("num_images_per_prompt", "batch_size"):
        if name in parameters:
            default = parameters[name].default
            current = pipe_kwargs.get(name, default if isinstance(default, int) else 1)
            return {**pipe_kwargs, name: current * factor}
    raise ValueError(f"search_pipeline(search={search!r}) runs all paths / particles in one pipeline call and "
                     "needs a pipeline that takes num_images_per_prompt= or batch_size=")


def _inference_steps(parameters, pipe_kwargs: dict) -> int | None:
    """The pipeline's step count when it can be read off its arguments (else None)."""
    if "num_inference_steps" not in parameters:
        return None
    value = pipe_kwargs.get("num_inference_steps", parameters["num_inference_steps"].default)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Driver:
    """Steers one pipeline call: replaces the scheduler's timesteps by a plan of states (which may go back to
    noisier states) and, after each step, lets the search replace the latents.

    ``search.plan(N) -> [states]`` gives the state (index into the stock N timesteps) of each model evaluation
    in order; ``search.after_step(driver, position, state, prev_sample, x0) -> latents`` sees each step's output
    and returns the latents for the next evaluation (re-noised, resampled or unchanged). The stock ``step`` does
    every step: the driver only sets the state it steps from (the step index of flow schedulers; stateless
    DDIM / DDPM read the timestep) and, for FK steering with DDIM, its ``eta`` and noise (from the search's
    stream: ``derive_seed(seed, Stream.STEP_NOISE, position)``).
    """

    def __init__(self, scheduler, family: str, search, *, eta: float | None, seed: int, bar):
        self.scheduler, self.family, self.search = scheduler, family, search
        self.eta, self.seed = eta, seed
        self.bar = bar
        self.runner = None  # the PipelineRunner of the call, which sets it
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
                             "steered search (paths, fk) needs the pipeline to run every timestep it is given, in "
                             "order (img2img strength and denoising_start / denoising_end are not supported)")
        return_dict = arguments.pop("return_dict", True)
        if self.eta is not None:  # FK steering with DDIM: stochastic steps from the search's stream
            arguments["eta"] = self.eta
            arguments["generator"] = None
            arguments["variance_noise"] = fastsearch.randn(
                model_output.shape, seed=derive_seed(self.seed, Stream.STEP_NOISE, self.position),
                device=model_output.device, dtype=model_output.dtype)
        scheduler = self.scheduler
        if self.family == "flow":
            # private diffusers attribute: the flow schedulers' step reads its sigmas at _step_index and diffusers
            # has no public setter (set_begin_index only applies before the first step); the plan may go back
            # to noisier states, so the index is set before every step
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


class _PathsInPipeline:
    """Search over paths inside one pipeline call of slots x n x M rows."""

    def __init__(self, options: PathsSearch, paths: int, decode: Callable):
        self.options, self.paths, self.decode = options, paths, decode
        self.history = []

    def plan(self, steps: int) -> list[int]:
        self.path_plan = self.options.plan(steps)
        states, self.selections = self.path_plan.evaluations()
        return states

    def after_step(self, driver: Driver, position: int, state: int, latents: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
        if position not in self.selections:
            return latents
        scores = driver.score_latents(self.decode, x0).view(-1, self.paths * self.options.branches)
        keep = top_rows(scores, self.paths)
        next_round = self.selections[position]
        renoised = self.path_plan.rounds[next_round][1]
        self.history.append({"round": next_round - 1, "state": state + 1, "nfe": driver.runner.rows // scores.shape[0],
                             "best_score": scores.flatten()[keep[:, 0]], "scores": scores})
        kept = latents[keep.flatten().to(latents.device)].repeat_interleave(self.options.branches, dim=0)
        return driver.renoise(kept, state, renoised, derive_seed(driver.seed, Stream.RENOISE, next_round))

    def finish(self, scores: torch.Tensor, nfe: int) -> None:
        """The last round's entry, from the final images' [slots, n M] ``scores``."""
        self.history.append({"round": len(self.path_plan.rounds) - 1, "state": self.path_plan.num_steps, "nfe": nfe,
                             "best_score": scores.flatten()[best_index(scores)], "scores": scores})


class _FKInPipeline:
    """FK steering inside one pipeline call of slots x n rows."""

    def __init__(self, options: FKSteering, particles: int, seed: int, decode: Callable):
        self.options, self.particles, self.seed, self.decode = options, particles, seed, decode
        self.weights = None
        self.history = []

    def plan(self, steps: int) -> list[int]:
        self.steps = steps
        return list(range(steps))

    def _weights(self, rows: int, device) -> ParticleWeights:
        if self.weights is None:
            self.weights = ParticleWeights(rows // self.particles, self.particles, self.options, self.seed, device)
        return self.weights

    def after_step(self, driver: Driver, position: int, state: int, latents: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
        if state == self.steps - 1 or not self.options.scores_after(state, self.steps):
            return latents  # the final images are scored by finish
        scores = driver.score_latents(self.decode, x0)
        weights = self._weights(latents.shape[0], scores.device)
        entry = weights.update(scores, step=state, nfe=driver.runner.rows // weights.slots, final=False)
        ancestors = weights.resample(entry)
        self.history.append(entry)
        return latents if ancestors is None else latents[ancestors.to(latents.device)]

    def finish(self, scores: torch.Tensor, nfe: int) -> None:
        """The final potentials, from the final images' [slots, n] ``scores``."""
        weights = self._weights(scores.numel(), scores.device)
        self.history.append(weights.update(scores.flatten(), step=self.steps - 1, nfe=nfe, final=True))


def steered_search(pipe, verifier: Callable, options: PathsSearch | FKSteering, parameters, pipe_kwargs: dict,
                   verifier_kwargs: dict, *, budget_nfe, seed: int, decode: Callable | None,
                   progress: bool) -> NoiseSearchResult:
    """Search over paths or FK steering as one pipeline call of slots x (n M or n) rows, steered step by step.

    The arguments are those of :func:`~fastsearch.integrations.diffusers.search_pipeline`, checked there;
    ``parameters`` are the pipeline's (``inspect.signature(pipe).parameters``).
    """
    paths = isinstance(options, PathsSearch)
    family = _scheduler_family(pipe.scheduler, options.name)
    budget = check_budget(options, budget_nfe)
    eta = None
    if not paths:
        if family == "ddim":
            eta = options.eta
        elif family == "flow" and not pipe.scheduler.config.get("stochastic_sampling", False):
            raise ValueError("fk steering needs stochastic steps: the flow-matching scheduler is deterministic; use "
                             "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                             "stochastic_sampling=True)")
    steps = _inference_steps(parameters, pipe_kwargs)
    plan = options.plan(steps) if paths and steps is not None else None  # bad options fail before anything runs
    unit = "path" if paths else "particle"
    if budget is None:
        count = getattr(options, options.count_name)
    elif steps is None:
        raise ValueError(f"budget_nfe needs the pipeline's num_inference_steps to price one {unit}; give "
                         f"{options.count_name} instead")
    else:
        cost = len(plan.evaluations()[0]) * options.branches if paths else steps
        count = count_within(options, budget, cost, unit)
    if decode is None:
        decoder, default = default_decoder(pipe), True
    else:
        decoder, default = decode, False
    if isinstance(pipe_kwargs.get("generator"), list):
        raise ValueError(f"search_pipeline(search={options.name!r}) multiplies the pipeline's images: pass one "
                         "torch.Generator, not a list")
    if paths:
        factor = count * options.branches
        search = _PathsInPipeline(options, count, decoder)
    else:
        factor = count
        search = _FKInPipeline(options, count, seed, decoder)
    kwargs = _multiply_images(parameters, pipe_kwargs, factor, options.name)
    with tqdm(desc=f"search_pipeline[{options.name}]", unit="step", disable=not progress) as bar, torch.no_grad():
        driver = Driver(pipe.scheduler, family, search, eta=eta, seed=seed, bar=bar)
        with PipelineRunner(pipe, verifier, verifier_kwargs, kwargs, driver=driver, rows_per_image=factor) as run:
            images, scores, _, _ = run(None)
        if images.shape[0] % factor:
            raise ValueError(f"the pipeline made {images.shape[0]} images, not a multiple of the {factor} rows per "
                             "image slot the search asked for")
        if driver.final_latents is None or driver.final_latents.shape[0] != images.shape[0]:
            raise ValueError("the pipeline's images do not come from the latents of its last scheduler step")
        _check_decoder(decoder, driver.final_latents, images, default)
    grouped = scores.view(-1, factor)
    best = best_index(grouped)
    search.finish(grouped, run.tally.nfe)
    return run.tally.result(images[best.to(images.device)], scores[best], grouped, search.history)
