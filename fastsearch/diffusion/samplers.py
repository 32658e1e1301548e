"""DDIM and flow-matching samplers on the fused step kernels, with per-sample start and stop steps.

A sampler owns a schedule of ``N`` steps. Its *states* are numbered ``0 ... N``: state ``i < N`` is a sample at
the noise level of step ``i`` (the level the model is called with), state ``N`` is the clean sample. A step
takes every sample from state ``i`` to ``i + 1``. ``sample(model, x, start=, stop=)`` runs each sample from
its own start state to its own stop state: at every iteration, all samples not yet at their stop are evaluated
together (one batched model call, chunked by ``batch_size`` rows), each at its own level, and stepped by one
fused kernel call with per-sample schedule values. Samples already at their stop are not evaluated.

Protocol:
    A denoiser is a callable ``model(x, level, **cond) -> output`` with ``x`` [B, ...] and ``level`` [B]: int64
    timesteps for :class:`DDIMSampler` (indices into ``alphas_cumprod``), float32 sigmas for
    :class:`FlowSampler`. The output has ``x``'s shape (it is cast to ``x``'s dtype).

Conditioning rule:
    In ``sample(model, x, **cond)``, a tensor in ``cond`` whose first dimension equals ``B = x.shape[0]`` is
    per-sample and follows the rows evaluated (:mod:`fastsearch.diffusion.batching`); anything else is passed
    unchanged to every call.

NFE accounting: one NFE per sample per model evaluation. Euler and DDIM steps cost 1; a Heun step costs 2,
except the final step into sigma 0, which is plain Euler (1), as in diffusers' FlowMatchHeunDiscreteScheduler.

Noise (DDIM with ``eta > 0``, stochastic flow) is drawn in-kernel from the Philox stream: iteration ``j`` of a
``sample`` call uses seed ``fastsearch.seeding.derive_seed(seed, j)`` over the rows stepped at that iteration, so
the same seed and the same inputs give the same result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.checks import check_choice, check_float, check_int, check_optional_int
from fastsearch.diffusion.batching import Conditioning, ModelCall
from fastsearch.diffusion.schedules import ddim_timesteps, flow_sigmas
from fastsearch.ops.steps import PREDICTION_TYPES
from fastsearch.seeding import derive_seed, resolve_seed

SOLVERS = ("euler", "heun")


class SamplerOutput(NamedTuple):
    """What :meth:`Sampler.sample` returns.

    Attributes:
        sample: [B, ...] like the input, each sample at its stop state.
        pred_original_sample: [B, ...] the x0 prediction made at each sample's last step (at state N it equals
            the sample up to rounding); NaN for samples that took no step.
        nfe: model evaluations spent, summed over samples (int).
    """

    sample: torch.Tensor
    pred_original_sample: torch.Tensor
    nfe: int


class Sampler(ABC):
    """Shared machinery of :class:`DDIMSampler` and :class:`FlowSampler` (see the module docstring).

    Subclasses set ``num_steps``, ``levels`` ([N] model levels), ``noise_levels`` ([N + 1] float32 re-noising
    levels of the states), ``renoise_schedule`` (``"vp"`` or ``"flow"``), ``_step_cost`` ([N] int64 NFEs per
    step) and implement ``_advance`` and ``predict_x0``.
    """

    num_steps: int
    levels: torch.Tensor
    noise_levels: torch.Tensor
    renoise_schedule: str
    _step_cost: torch.Tensor

    @property
    @abstractmethod
    def stochastic(self) -> bool:
        """Whether steps draw fresh noise (what particle methods such as FK steering need)."""

    def _finish_init(self) -> None:
        self._cumulative_cost = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(self._step_cost, 0)])
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _table(self, device: torch.device, name: str) -> torch.Tensor:
        tables = self._tables.setdefault(device, {})
        if name not in tables:
            tables[name] = getattr(self, "_" + name + "_cpu").to(device)
        return tables[name]

    # -- indices, levels, costs ----------------------------------------------------------------------------

    def _state_arg(self, name: str, value, default: int, batch: int) -> torch.Tensor:
        """A per-sample state index as a CPU int64 [batch] tensor, checked to lie in [0, N]."""
        if value is None:
            return torch.full((batch,), default, dtype=torch.int64)
        if isinstance(value, bool) or not isinstance(value, int | torch.Tensor):
            raise TypeError(f"{name} must be an int or an integer tensor of shape [B], got {type(value).__name__}")
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer step indices, got dtype {value.dtype}")
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
                raise ValueError(f"{name} must be an int or a tensor of shape [B]={[batch]}, got shape "
                                 f"{list(value.shape)}")
            index = value.to("cpu", torch.int64).expand(batch).clone()
        else:
            index = torch.full((batch,), value, dtype=torch.int64)
        if batch and (int(index.min()) < 0 or int(index.max()) > self.num_steps):
            raise ValueError(f"{name} must be a step index in [0, num_steps={self.num_steps}], got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        return index

    def nfe(self, start=0, stop=None):
        """NFEs to run from state ``start`` to state ``stop`` (default N).

        Args:
            start, stop: ints, or integer tensors of shape [B] (per sample).

        Returns:
            an int for int arguments, else an int64 [B] tensor of per-sample costs.
        """
        if isinstance(start, torch.Tensor) or isinstance(stop, torch.Tensor):
            batch = next(v.numel() for v in (start, stop) if isinstance(v, torch.Tensor))
            begin = self._state_arg("start", start, 0, batch)
            end = self._state_arg("stop", stop, self.num_steps, batch)
            if bool((end < begin).any()):
                raise ValueError("stop must not come before start")
            return self._cumulative_cost[end] - self._cumulative_cost[begin]
        begin = int(self._state_arg("start", start, 0, 1)[0])
        end = int(self._state_arg("stop", stop, self.num_steps, 1)[0])
        if end < begin:
            raise ValueError(f"stop={end} comes before start={begin}")
        return int(self._cumulative_cost[end] - self._cumulative_cost[begin])

    def noise_level(self, index) -> torch.Tensor:
        """Re-noising level of state ``index`` (int or integer tensor): alpha_prod (``"vp"``) or sigma
        (``"flow"``), float32, in the form :func:`fastsearch.renoise` takes (``schedule=self.renoise_schedule``)."""
        if isinstance(index, torch.Tensor):
            return self.noise_levels.to(index.device)[index.long()]
        return self.noise_levels[index]

    def renoise(self, x: torch.Tensor, index_from, index_to, *, seed: int | None = None,
                row_offset: int | None = None) -> torch.Tensor:
        """Forward-noise ``x`` from state ``index_from`` to the noisier state ``index_to`` (``index_to <=
        index_from``) with the exact marginal (:func:`fastsearch.renoise`).

        Args:
            x: [B, ...] float32 / float16 / bfloat16 at state ``index_from``.
            index_from, index_to: ints or integer [B] tensors (per sample).
            seed: int; drawn from torch's generator when None.
            row_offset: as in :meth:`run` (rows ``x`` are a shard of a larger batch).

        Returns:
            [B, ...] like ``x``.
        """
        if isinstance(index_from, int) and isinstance(index_to, int) and 0 <= index_to <= index_from <= self.num_steps:
            begin, end = index_from, index_to  # the common case, checked without tensors
        else:
            begin = self._state_arg("index_from", index_from, 0, x.shape[0])
            end = self._state_arg("index_to", index_to, 0, x.shape[0])
            if bool((end > begin).any()):
                raise ValueError("index_to must not come after index_from (re-noising goes to a noisier state)")
        return fastsearch.renoise(x, self._levels_for(begin, x.device, "noise_levels"),
                                  self._levels_for(end, x.device, "noise_levels"), schedule=self.renoise_schedule,
                                  **self._step_noise(x, seed, row_offset))

    def _levels_for(self, index: int | torch.Tensor, device: torch.device, name: str):
        """Schedule values of step ``index`` (an int, or per-sample CPU int64 indices): a float when all samples
        share it (the kernel then reads no schedule tensor), else a float32 [B] tensor on ``device``."""
        if isinstance(index, torch.Tensor):
            first = int(index[0]) if index.numel() else 0
            if index.numel() and not bool((index == first).all()):
                return self._table(device, name)[index.to(device)]
            index = first
        return float(getattr(self, "_" + name + "_cpu")[index])

    # -- the loop ---------------------------------------------------------------------------------------------

    def sample(self, model: Callable, x: torch.Tensor, *, start=None, stop=None, seed: int | None = None,
               batch_size: int | None = None, progress: bool = False, **cond) -> SamplerOutput:
        """Run every sample from its start state to its stop state.

        Args:
            model: ``model(x, level, **cond)`` (see the module docstring).
            x: [B, ...] float32 / float16 / bfloat16 samples at their start states.
            start: int or integer [B] tensor of start states in [0, N] (default 0: pure noise).
            stop: int or integer [B] tensor of stop states in [start, N] (default N: clean).
            seed: int seeding the step noise of a stochastic sampler (drawn from torch's generator when None);
                ignored by deterministic samplers.
            batch_size: at most this many rows per model call (None: all active rows at once).
            progress: show a tqdm bar of NFEs.
            **cond: conditioning passed to the model (per-sample tensors follow the rows, see the module docstring).

        Returns:
            :class:`SamplerOutput` ``(sample, pred_original_sample, nfe)``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a tensor with a batch dimension, got {type(x).__name__}")
        batch = x.shape[0]
        begin = self._state_arg("start", start, 0, batch)
        end = self._state_arg("stop", stop, self.num_steps, batch)
        if bool((end < begin).any()):
            raise ValueError("stop must not come before start for any sample")
        total = int((self._cumulative_cost[end] - self._cumulative_cost[begin]).sum())
        batch_size = check_optional_int("batch_size", batch_size)
        if not progress:  # a disabled tqdm still costs a lock and a registry update per call
            return self.run(ModelCall(model, Conditioning(cond, batch), batch_size), x, begin, end, seed)
        with tqdm(total=total, unit="nfe", desc=type(self).__name__) as bar:
            return self.run(ModelCall(model, Conditioning(cond, batch), batch_size, bar.update), x, begin, end, seed)

    def run(self, call: ModelCall, x: torch.Tensor, start: int | torch.Tensor, stop: int | torch.Tensor,
            seed: int | None, row_offset: int | None = None) -> SamplerOutput:
        """The loop of :meth:`sample`, for searches that prepare their own model call (conditioning per prompt,
        NFE counting).

        Args:
            call: the model with its conditioning and chunking.
            x: [B, ...] samples at their start states.
            start, stop: checked states: ints shared by all samples, or CPU int64 [B] tensors.
            seed: as in :meth:`sample`.
            row_offset: rows ``x`` are rows ``row_offset ...`` of a larger batch (a shard of a distributed search):
                the step noise of row r is then that batch's, stream positions from ``(row_offset + r) * numel``,
                so a shard draws exactly the noise the whole batch draws for it. Only with int ``start``/``stop``.
        """
        if row_offset is not None and not isinstance(start, int):
            raise ValueError("row_offset needs start and stop shared by all samples (ints)")
        if self.stochastic:
            seed = resolve_seed(seed)
        nfe_before = call.nfe
        if x.shape[0] == 0:
            return SamplerOutput(x, x.clone(), 0)
        if isinstance(start, int):
            first_start, first_stop, uniform = start, stop, True
        else:
            first_start, first_stop = int(start[0]), int(stop[0])
            uniform = bool((start == first_start).all()) and bool((stop == first_stop).all())
        if uniform:
            # every sample takes the same steps: no per-iteration bookkeeping
            out, pred_x0 = x, None
            for iteration, index in enumerate(range(first_start, first_stop)):
                out, pred_x0 = self._advance(call, out, index, slice(None), self._step_seed(seed, iteration),
                                             want_x0=index + 1 == first_stop, row_offset=row_offset)
            if pred_x0 is None:
                pred_x0 = torch.full_like(x, float("nan"))
            return SamplerOutput(out, pred_x0, call.nfe - nfe_before)
        index = start.clone()
        out, owned = x, False
        pred_x0 = torch.full_like(x, float("nan"))
        iteration = 0
        while True:
            active = index < stop
            rows_cpu = active.nonzero().squeeze(1)
            if rows_cpu.numel() == 0:
                break
            rows = rows_cpu.to(x.device)
            step_index = index[rows_cpu]
            finishing = step_index + 1 == stop[rows_cpu]
            prev, x0 = self._advance(call, out.index_select(0, rows), step_index, rows,
                                     self._step_seed(seed, iteration), want_x0=bool(finishing.any()))
            if not owned:  # never write into the caller's tensor
                out, owned = out.clone(), True
            out.index_copy_(0, rows, prev)
            if bool(finishing.any()):
                finishing_device = finishing.to(x.device)
                pred_x0.index_copy_(0, rows[finishing_device], x0[finishing_device])
            index[rows_cpu] += 1
            iteration += 1
        return SamplerOutput(out, pred_x0, call.nfe - nfe_before)

    def _step_seed(self, seed: int | None, iteration: int) -> int | None:
        return derive_seed(seed, iteration) if self.stochastic else None

    @abstractmethod
    def _advance(self, call: ModelCall, x: torch.Tensor, index: int | torch.Tensor, rows: slice | torch.Tensor,
                 seed: int | None, want_x0: bool,
                 row_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step for rows ``x`` (batch rows ``rows``) at step ``index`` (an int shared by all, or per-sample
        CPU int64 indices); returns ``(prev, x0 or None)`` (x0 at least when ``want_x0``). ``row_offset``: as in
        :meth:`run`."""

    @staticmethod
    def _step_noise(x: torch.Tensor, seed: int | None, row_offset: int | None) -> dict:
        """The step op's noise argument: ``seed=`` (in-kernel noise from stream position 0), or for a shard the same
        stream's numbers from its first row's position as ``noise=`` (the kernels draw exactly these)."""
        if seed is None or row_offset is None:
            return {"seed": seed}
        per_row = x[0].numel() if x.shape[0] else 0
        return {"noise": fastsearch.randn(x.shape, seed=seed, offset=row_offset * per_row, device=x.device,
                                          dtype=x.dtype)}

    @abstractmethod
    def predict_x0(self, x: torch.Tensor, model_output: torch.Tensor, index) -> torch.Tensor:
        """The model's prediction of the clean sample from ``x`` at step ``index`` (int or [B] tensor)."""

    def _model_levels(self, index: int | torch.Tensor, batch: int, device: torch.device,
                      name: str = "levels") -> torch.Tensor:
        """The model's [batch] level argument at step ``index`` (int or per-sample CPU int64), from table ``name``."""
        table = self._table(device, name)
        if isinstance(index, torch.Tensor):
            return table[index.to(device)]
        return table[index:index + 1].expand(batch)


class DDIMSampler(Sampler):
    """DDIM (diffusers ``DDIMScheduler``) on :func:`fastsearch.ddim_step`, with per-sample levels.

    Step ``i`` calls the model at timestep ``t_i`` and moves to ``t_i - T // N`` (``final_alpha_cumprod`` below 0),
    exactly as diffusers does for every ``timestep_spacing``.

    Args:
        alphas_cumprod: [T] float tensor (or sequence), the training schedule.
        num_steps: N inference steps, 1 <= N <= T.
        eta: DDIM stochasticity (0: deterministic; > 0 makes the sampler stochastic, as FK steering needs).
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (as diffusers).
        steps_offset: added to the timesteps with ``"leading"`` spacing.
        final_alpha_cumprod: alpha_prod after the last step (diffusers: 1.0 with ``set_alpha_to_one``, else
            ``alphas_cumprod[0]``).
        clip_sample_range: clip x0 predictions to ``[-r, r]`` (diffusers' ``clip_sample``); None: no clipping.
        use_clipped_model_output: re-derive epsilon from the clipped x0.

    Attributes:
        levels: int64 [N] timesteps (the model's level argument).
        noise_levels: float32 [N + 1]: alpha_prod of each state (``alphas_cumprod[t_i]``, then the final value).
    """

    renoise_schedule = "vp"

    def __init__(self, alphas_cumprod, num_steps: int, *, eta: float = 0.0, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0, final_alpha_cumprod: float = 1.0,
                 clip_sample_range: float | None = None, use_clipped_model_output: bool = False):
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point() or alphas_cumprod.numel() == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D float tensor, got shape "
                             f"{list(alphas_cumprod.shape)} and dtype {alphas_cumprod.dtype}")
        alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        if not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        train_steps = alphas_cumprod.numel()
        num_steps = check_int("num_steps", num_steps)
        if num_steps > train_steps:
            raise ValueError(f"num_steps={num_steps} exceeds the {train_steps} training timesteps")
        eta = check_float("eta", eta, low=0.0)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if clip_sample_range is not None:
            clip_sample_range = check_float("clip_sample_range", clip_sample_range, low=0.0, low_open=True)
        check_float("final_alpha_cumprod", final_alpha_cumprod, low=0.0, high=1.0, low_open=True)
        timesteps = ddim_timesteps(train_steps, num_steps, timestep_spacing, steps_offset)
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= train_steps:
            raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {train_steps})")
        prev_timesteps = timesteps - train_steps // num_steps
        final = torch.tensor(float(final_alpha_cumprod), dtype=torch.float32)
        self.alphas_cumprod = alphas_cumprod
        self.num_steps = num_steps
        self.eta = eta
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.clip_sample_range = clip_sample_range
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.levels = timesteps
        self._levels_cpu = timesteps
        self._alpha_cpu = alphas_cumprod[timesteps]
        self._alpha_prev_cpu = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final)
        self.noise_levels = torch.cat([self._alpha_cpu, self._alpha_prev_cpu[-1:]])
        self._noise_levels_cpu = self.noise_levels
        self._step_cost = torch.ones(num_steps, dtype=torch.int64)
        self._finish_init()

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def __repr__(self) -> str:
        return (f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta:g}, prediction_type={self.prediction_type!r}, "
                f"timestep_spacing={self.timestep_spacing!r})")

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int | None = None, *, eta: float = 0.0) -> DDIMSampler:
        """Build from a diffusers ``DDIMScheduler`` (its ``alphas_cumprod`` and config).

        Args:
            scheduler: the scheduler; its ``thresholding`` (dynamic thresholding) is not supported.
            num_steps: inference steps; default ``scheduler.num_inference_steps`` (after ``set_timesteps``).
            eta: DDIM stochasticity (diffusers takes it at step time, not in the config).

        Returns:
            a sampler whose ``levels`` equal ``scheduler.timesteps`` after ``set_timesteps(num_steps)``.
        """
        config = getattr(scheduler, "config", None)
        if config is None or not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"scheduler must be a diffusers DDIMScheduler, got {type(scheduler).__name__}")
        if config.get("thresholding", False):
            raise ValueError("scheduler.config.thresholding (dynamic thresholding) is not supported by the fused "
                             "DDIM step; use clip_sample instead")
        num_steps = _scheduler_steps(scheduler, num_steps)
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        return cls(scheduler.alphas_cumprod, num_steps, eta=eta,
                   prediction_type=config.get("prediction_type", "epsilon"),
                   timestep_spacing=config.get("timestep_spacing", "leading"),
                   steps_offset=config.get("steps_offset", 0), final_alpha_cumprod=final, clip_sample_range=clip)

    def _ddim_kwargs(self) -> dict:
        return {"prediction_type": self.prediction_type, "clip_sample_range": self.clip_sample_range,
                "use_clipped_model_output": self.use_clipped_model_output}

    def _advance(self, call, x, index, rows, seed, want_x0, row_offset=None):
        output = call(x, self._model_levels(index, x.shape[0], x.device), rows)
        return fastsearch.ddim_step(x, output, self._levels_for(index, x.device, "alpha"),
                                    self._levels_for(index, x.device, "alpha_prev"), eta=self.eta,
                                    **self._step_noise(x, seed, row_offset), **self._ddim_kwargs())

    def predict_x0(self, x: torch.Tensor, model_output: torch.Tensor, index) -> torch.Tensor:
        """x0 from the model output at step ``index`` (int or integer [B] tensor), clipped like the steps."""
        index = self._state_arg("index", index, 0, x.shape[0])
        if bool((index >= self.num_steps).any()):
            raise ValueError(f"index must be a step in [0, num_steps={self.num_steps})")
        alpha = self._levels_for(index, x.device, "alpha")
        return fastsearch.ddim_step(x, model_output, alpha, alpha, **self._ddim_kwargs()).pred_original_sample


def _scheduler_steps(scheduler, num_steps: int | None) -> int:
    if num_steps is None:
        num_steps = getattr(scheduler, "num_inference_steps", None)
        if num_steps is None:
            raise ValueError("num_steps is needed: the scheduler has no num_inference_steps (call set_timesteps "
                             "first, or pass num_steps)")
    return check_int("num_steps", num_steps)


# -- flow matching ----------------------------------------------------------------------------------------------


class FlowSampler(Sampler):
    """Rectified-flow sampling (``x_s = (1 - s) x0 + s noise``) on the fused Euler / Heun kernels.

    Solvers: ``"euler"`` (diffusers ``FlowMatchEulerDiscreteScheduler``; with ``stochastic=True`` its
    ``stochastic_sampling``: ``x0 = x - s v``, ``prev = (1 - s') x0 + s' noise``) and ``"heun"`` (diffusers
    ``FlowMatchHeunDiscreteScheduler``: Euler predictor, trapezoidal corrector, plain Euler into sigma 0).

    Args:
        num_steps: N >= 1.
        shift: the static timestep shift ``shift s / (1 + (shift - 1) s)`` (diffusers' ``shift``).
        solver: ``"euler"`` or ``"heun"``.
        stochastic: use the stochastic Euler step (Euler only).
        num_train_timesteps: of the training grid (diffusers' default 1000).
        sigmas: an explicit decreasing schedule of N sigmas in (0, 1] (a final 0 is appended); then ``shift``
            must stay 1.0.

    Attributes:
        levels: float32 [N] sigmas (the model's level argument).
        noise_levels: float32 [N + 1]: the sigmas and the final 0.
    """

    renoise_schedule = "flow"

    def __init__(self, num_steps: int, *, shift: float = 1.0, solver: str = "euler", stochastic: bool = False,
                 num_train_timesteps: int = 1000, sigmas=None):
        num_steps = check_int("num_steps", num_steps)
        check_choice("solver", solver, SOLVERS)
        if stochastic and solver != "euler":
            raise ValueError("stochastic=True needs solver='euler' (the stochastic step is an Euler step)")
        shift = check_float("shift", shift, low=0.0, low_open=True)
        if sigmas is None:
            sigmas = flow_sigmas(num_steps, shift=shift,
                                 num_train_timesteps=check_int("num_train_timesteps", num_train_timesteps))
        else:
            if shift != 1.0:
                raise ValueError("give shift or sigmas, not both (sigmas are used as given)")
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
            if sigmas.numel() != num_steps:
                raise ValueError(f"sigmas must hold num_steps={num_steps} values, got {sigmas.numel()}")
            if not bool(((sigmas > 0) & (sigmas <= 1)).all()) or bool((sigmas[1:] >= sigmas[:-1]).any()):
                raise ValueError("sigmas must decrease strictly and lie in (0, 1]")
        self.num_steps = num_steps
        self.shift = shift
        self.solver = solver
        self._stochastic = bool(stochastic)
        self.levels = sigmas
        self._levels_cpu = sigmas
        self.noise_levels = torch.cat([sigmas, torch.zeros(1)])
        self._noise_levels_cpu = self.noise_levels
        self._sigma_cpu = sigmas
        self._sigma_next_cpu = self.noise_levels[1:]
        cost = torch.full((num_steps,), 2 if solver == "heun" else 1, dtype=torch.int64)
        cost[-1] = 1  # the step into sigma 0 is plain Euler
        self._step_cost = cost
        self._finish_init()

    @property
    def stochastic(self) -> bool:
        return self._stochastic

    def __repr__(self) -> str:
        return f"FlowSampler(num_steps={self.num_steps}, solver={self.solver!r}, stochastic={self._stochastic})"

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int | None = None, *, mu: float | None = None,
                       stochastic: bool | None = None) -> FlowSampler:
        """Build from a diffusers ``FlowMatchEulerDiscreteScheduler`` or ``FlowMatchHeunDiscreteScheduler`` config.

        Supported config: ``num_train_timesteps``, ``shift``, ``use_dynamic_shifting`` (pass ``mu``, as to
        ``set_timesteps``), ``time_shift_type``, ``shift_terminal``, ``stochastic_sampling``. Karras /
        exponential / beta sigmas and ``invert_sigmas`` are not: for those, call ``set_timesteps`` and pass
        ``FlowSampler(N, sigmas=scheduler.sigmas[:-1])``.

        Args:
            scheduler: the scheduler.
            num_steps: default ``scheduler.num_inference_steps``.
            mu: the dynamic-shifting parameter (needed with ``use_dynamic_shifting``).
            stochastic: overrides ``stochastic_sampling``.

        Returns:
            a sampler whose ``levels`` equal the scheduler's sigmas after ``set_timesteps(num_steps, mu=mu)``.
        """
        name = type(scheduler).__name__
        if name not in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
            raise TypeError(f"scheduler must be a FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler, "
                            f"got {name}")
        config = scheduler.config
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if config.get(option, False):
                raise ValueError(f"scheduler.config.{option} is not supported; pass FlowSampler(num_steps, "
                                 "sigmas=scheduler.sigmas[:-1]) after set_timesteps instead")
        dynamic = config.get("use_dynamic_shifting", False)
        if dynamic and mu is None:
            raise ValueError("mu is needed: the scheduler uses dynamic shifting")
        num_steps = _scheduler_steps(scheduler, num_steps)
        sigmas = flow_sigmas(num_steps, shift=config.get("shift", 1.0),
                             num_train_timesteps=config.get("num_train_timesteps", 1000),
                             mu=mu if dynamic else None, time_shift_type=config.get("time_shift_type", "exponential"),
                             shift_terminal=config.get("shift_terminal", None))
        solver = "heun" if name == "FlowMatchHeunDiscreteScheduler" else "euler"
        if stochastic is None:
            stochastic = bool(config.get("stochastic_sampling", False))
        return cls(num_steps, solver=solver, stochastic=stochastic, sigmas=sigmas)

    def _advance(self, call, x, index, rows, seed, want_x0, row_offset=None):
        sigma = self._levels_for(index, x.device, "sigma")
        sigma_next = self._levels_for(index, x.device, "sigma_next")
        velocity = call(x, self._model_levels(index, x.shape[0], x.device), rows)
        predicted = fastsearch.flow_euler_step(x, velocity, sigma, sigma_next, **self._step_noise(x, seed, row_offset),
                                               stochastic=self._stochastic)
        x0 = self._x0(x, velocity, sigma) if want_x0 else None
        if self.solver == "euler":
            return predicted, x0
        corrected = self._sigma_next_cpu[index] > 0
        if bool(corrected.all()):
            velocity_next = call(predicted, self._model_levels(index, x.shape[0], x.device, "sigma_next"), rows)
            return fastsearch.flow_heun_step(x, velocity, velocity_next, sigma, sigma_next), x0
        if bool(corrected.any()):  # samples at the last step take the Euler step alone
            sub = corrected.nonzero().squeeze(1)
            sub_device = sub.to(x.device)
            sub_index = index[sub]
            sub_pred = predicted.index_select(0, sub_device)
            velocity_next = call(sub_pred, self._model_levels(sub_index, sub.numel(), x.device, "sigma_next"),
                                 rows[sub_device])
            corrector = fastsearch.flow_heun_step(
                x.index_select(0, sub_device), velocity.index_select(0, sub_device), velocity_next,
                self._levels_for(sub_index, x.device, "sigma"), self._levels_for(sub_index, x.device, "sigma_next"))
            predicted = predicted.index_copy(0, sub_device, corrector)
        return predicted, x0

    def _x0(self, x: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
        return (x.float() - sigma * velocity.float()).to(x.dtype)

    def predict_x0(self, x: torch.Tensor, model_output: torch.Tensor, index) -> torch.Tensor:
        """x0 = x - sigma v at step ``index`` (int or integer [B] tensor)."""
        index = self._state_arg("index", index, 0, x.shape[0])
        return self._x0(x, model_output, self._levels_for(index, x.device, "noise_levels"))
