"""Batched sampler steps with per-sample schedules: DDIM, flow-matching Euler / Heun, re-noising.

Each step is one fused pass over memory: it reads the sample and the model output once, computes in
fp32 registers, draws its noise in-kernel when given ``seed=``, and writes the result once. Schedule
values (``alpha_prod_t``, ``sigma``, ...) are a Python float, a 0-d tensor, or a tensor of shape [B]
holding one value per sample, which is what lets search over paths and particle methods step samples
that sit at different noise levels in one call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsearch import _backend
from fastsearch.ops._common import (
    Op,
    check_data,
    check_readable,
    lib,
    method_code,
    per_sample,
    refuse_meta,
    schedule_arg,
    tensor_arg,
    tensor_positions,
)
from fastsearch.ops._step_checks import (
    check_ddim_step,
    check_flow_euler_step,
    check_flow_heun_step,
    check_levels,
    check_renoise,
    clip_arg,
    eta_arg,
)
from fastsearch.ops.noise import randn_reference
from fastsearch.seeding import check_seed, fresh_seed

PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
RENOISE_SCHEDULES = {"vp": 0, "flow": 1}

_DDIM_STEP_ARGS = (
    "Tensor sample, Tensor model_output, Tensor? alpha_prod_t, float alpha_prod_t_value, Tensor? alpha_prod_t_prev, "
    "float alpha_prod_t_prev_value, float eta, Tensor? noise, int? seed, int prediction_type, "
    "float? clip_sample_range, bool use_clipped_model_output")
_FLOW_EULER_STEP_ARGS = (
    "Tensor sample, Tensor velocity, Tensor? sigma, float sigma_value, Tensor? sigma_next, float sigma_next_value, "
    "Tensor? noise, int? seed, bool stochastic")
_FLOW_HEUN_STEP_ARGS = (
    "Tensor sample, Tensor velocity, Tensor velocity_next, Tensor? sigma, float sigma_value, Tensor? sigma_next, "
    "float sigma_next_value")
_RENOISE_ARGS = (
    "Tensor sample, Tensor? level_from, float level_from_value, Tensor? level_to, float level_to_value, "
    "int schedule, Tensor? noise, int? seed")

# torch.compile functionalizes an op whose results alias its out= arguments only when the op carries this tag;
# a torch without the tag runs the .out overloads eagerly all the same.
_OUT_TAGS = (torch.Tag.out,) if hasattr(torch.Tag, "out") else ()

lib.define(f"ddim_step({_DDIM_STEP_ARGS}) -> (Tensor, Tensor)")
lib.define(f"flow_euler_step({_FLOW_EULER_STEP_ARGS}) -> Tensor")
lib.define(f"flow_heun_step({_FLOW_HEUN_STEP_ARGS}) -> Tensor")
lib.define(f"renoise({_RENOISE_ARGS}) -> Tensor")
# The out= variants, as PyTorch's own: same arguments, then keyword-only outputs that are written and returned.
lib.define(f"ddim_step.out({_DDIM_STEP_ARGS}, *, Tensor(a!) prev_sample, Tensor(b!) pred_original_sample) "
           "-> (Tensor(a!), Tensor(b!))", tags=_OUT_TAGS)
lib.define(f"flow_euler_step.out({_FLOW_EULER_STEP_ARGS}, *, Tensor(a!) out) -> Tensor(a!)", tags=_OUT_TAGS)
lib.define(f"flow_heun_step.out({_FLOW_HEUN_STEP_ARGS}, *, Tensor(a!) out) -> Tensor(a!)", tags=_OUT_TAGS)
lib.define(f"renoise.out({_RENOISE_ARGS}, *, Tensor(a!) out) -> Tensor(a!)", tags=_OUT_TAGS)


class DDIMStepOutput(NamedTuple):
    """What :func:`ddim_step` returns, with the field names of diffusers' ``DDIMSchedulerOutput``.

    Attributes:
        prev_sample: x at the previous (less noisy) level, like ``sample``.
        pred_original_sample: the x0 prediction (clipped when ``clip_sample_range`` is given), like ``sample``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _noise_reference(noise, seed, sample):
    if noise is not None:
        return noise.float()
    return randn_reference(sample.numel(), seed, 0, sample.device).view(sample.shape)


# -- references -------------------------------------------------------------------------------------


def _ddim_step_reference(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev,
                         alpha_prod_t_prev_value, eta, noise, seed, prediction_type, clip_sample_range,
                         use_clipped_model_output):
    x, m = sample.float(), model_output.float()
    alpha = per_sample(alpha_prod_t, alpha_prod_t_value, x)
    alpha_prev = per_sample(alpha_prod_t_prev, alpha_prod_t_prev_value, x)
    beta = 1.0 - alpha
    if prediction_type == 0:
        x0 = (x - beta.sqrt() * m) / alpha.sqrt()
        eps = m
    elif prediction_type == 1:
        x0 = m
        eps = (x - alpha.sqrt() * x0) / beta.sqrt()
    else:
        x0 = alpha.sqrt() * x - beta.sqrt() * m
        eps = alpha.sqrt() * m + beta.sqrt() * x
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        if use_clipped_model_output:
            eps = (x - alpha.sqrt() * x0) / beta.sqrt()
    std = eta * (((1.0 - alpha_prev) / beta) * (1.0 - alpha / alpha_prev)).sqrt()
    direction = torch.clamp(1.0 - alpha_prev - std * std, min=0.0).sqrt()
    prev = alpha_prev.sqrt() * x0 + direction * eps
    if eta > 0:
        prev = prev + std * _noise_reference(noise, seed, sample)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def _flow_euler_step_reference(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed,
                               stochastic):
    x, v = sample.float(), velocity.float()
    s = per_sample(sigma, sigma_value, x)
    s_next = per_sample(sigma_next, sigma_next_value, x)
    if stochastic:
        prev = (1.0 - s_next) * (x - s * v) + s_next * _noise_reference(noise, seed, sample)
    else:
        prev = x + (s_next - s) * v
    return prev.to(sample.dtype)


def _flow_heun_step_reference(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value):
    x = sample.float()
    s = per_sample(sigma, sigma_value, x)
    s_next = per_sample(sigma_next, sigma_next_value, x)
    prev = x + (s_next - s) * 0.5 * (velocity.float() + velocity_next.float())
    return prev.to(sample.dtype)


def _renoise_reference(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed):
    x = sample.float()
    start = per_sample(level_from, level_from_value, x)
    end = per_sample(level_to, level_to_value, x)
    # The noise variance as a product of differences (csrc/README.md): 0 for equal levels, and no
    # cancellation for nearby ones. Where it is 0 the noise term is left out: equal levels are the identity.
    if schedule == 0:
        scale = (end / start).sqrt()
        variance = (start - end) / start
    else:
        scale = (1.0 - end) / (1.0 - start)
        variance = ((end - start) / (1.0 - start)) * (end + scale * start)
    noise_scale = torch.clamp(variance, min=0.0).sqrt()
    kept = scale * x
    moved = kept + noise_scale * _noise_reference(noise, seed, sample)
    return torch.where(noise_scale == 0, kept, moved).to(sample.dtype)


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::ddim_step_triton", mutates_args=())
def _ddim_step_triton(sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t: torch.Tensor | None,
                      alpha_prod_t_value: float, alpha_prod_t_prev: torch.Tensor | None,
                      alpha_prod_t_prev_value: float, eta: float, noise: torch.Tensor | None, seed: int | None,
                      prediction_type: int, clip_sample_range: float | None,
                      use_clipped_model_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastsearch.kernels import steps as kernels

    prev, x0 = _like_sample(sample), _like_sample(sample)
    kernels.ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev,
                      alpha_prod_t_prev_value, eta, noise, seed, prediction_type, clip_sample_range,
                      use_clipped_model_output, prev, x0)
    return prev, x0


@torch.library.custom_op("fastsearch::flow_euler_step_triton", mutates_args=())
def _flow_euler_step_triton(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | None,
                            sigma_value: float, sigma_next: torch.Tensor | None, sigma_next_value: float,
                            noise: torch.Tensor | None, seed: int | None, stochastic: bool) -> torch.Tensor:
    from fastsearch.kernels import steps as kernels

    prev = _like_sample(sample)
    kernels.flow_euler_step(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed,
                            stochastic, prev)
    return prev


@torch.library.custom_op("fastsearch::flow_heun_step_triton", mutates_args=())
def _flow_heun_step_triton(sample: torch.Tensor, velocity: torch.Tensor, velocity_next: torch.Tensor,
                           sigma: torch.Tensor | None, sigma_value: float, sigma_next: torch.Tensor | None,
                           sigma_next_value: float) -> torch.Tensor:
    from fastsearch.kernels import steps as kernels

    prev = _like_sample(sample)
    kernels.flow_heun_step(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value, prev)
    return prev


@torch.library.custom_op("fastsearch::renoise_triton", mutates_args=())
def _renoise_triton(sample: torch.Tensor, level_from: torch.Tensor | None, level_from_value: float,
                    level_to: torch.Tensor | None, level_to_value: float, schedule: int,
                    noise: torch.Tensor | None, seed: int | None) -> torch.Tensor:
    from fastsearch.kernels import steps as kernels

    out = _like_sample(sample)
    kernels.renoise(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed, out)
    return out


def _like_sample(sample, *args):
    return torch.empty_like(sample, memory_format=torch.contiguous_format)


def _ddim_step_fake(sample, *args):
    return _like_sample(sample), _like_sample(sample)


DDIM_STEP = Op("ddim_step", _ddim_step_triton, check_ddim_step, _ddim_step_reference, _ddim_step_fake)
FLOW_EULER_STEP = Op("flow_euler_step", _flow_euler_step_triton, check_flow_euler_step, _flow_euler_step_reference,
                     _like_sample)
FLOW_HEUN_STEP = Op("flow_heun_step", _flow_heun_step_triton, check_flow_heun_step, _flow_heun_step_reference,
                    _like_sample)
RENOISE = Op("renoise", _renoise_triton, check_renoise, _renoise_reference, _like_sample)


# -- out= variants ---------------------------------------------------------------------------------------


def _check_out(name: str, out, sample: torch.Tensor) -> None:
    """``out`` receives a result like ``sample``: same dtype, shape and device, contiguous."""
    check_data(name, out, sample)
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """How the bytes of two contiguous tensors on one device overlap: "none", "same" (the same start and end:
    the very same elements for one dtype and shape) or "partial"."""
    if a.numel() == 0 or b.numel() == 0:
        return "none"
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    a_end, b_end = a_begin + a.numel() * a.element_size(), b_begin + b.numel() * b.element_size()
    if a_begin == b_begin and a_end == b_end:
        return "same"
    return "partial" if a_begin < b_end and b_begin < a_end else "none"


class _OutOp:
    """The out= form of a step op (aliasing rules: ``csrc/common/out_checks.h``).

    ``native`` is the C++ overload ``fastsearch::<name>.out`` (CPU and CUDA keys; it checks ``out`` in C++),
    ``triton`` the custom op ``fastsearch::<name>_triton_out`` (outputs last and positional: only a torch
    with ``torch.Tag.out`` lets a custom op take keyword-only tensors), and the reference's result is copied
    into ``out``. ``reads`` are the arguments a
    step reads element by element beside its outputs (an output may be one of them, not overlap one in part),
    ``schedules`` those it reads per sample (no output may overlap them).
    """

    __slots__ = ("op", "name", "native", "triton", "out_names", "messages", "reads", "schedules", "tensor_args")

    def __init__(self, op: Op, schema_args: str, out_names: tuple[str, ...], messages: tuple[str, ...],
                 reads: tuple[str, ...], schedules: tuple[str, ...]):
        self.op = op
        self.name = f"{op.name}.out"
        self.native = getattr(torch.ops.fastsearch, op.name).out
        self.out_names = out_names
        self.messages = messages  # how errors name each output
        position = {arg.name: index for index, arg in enumerate(self.native._schema.arguments)}
        self.reads = tuple((name, position[name]) for name in reads)
        self.schedules = tuple((name, position[name]) for name in schedules)
        self.tensor_args = tensor_positions(self.native._schema)
        outputs = ", ".join(f"Tensor({alias}!) {name}" for alias, name in zip("ab", out_names, strict=False))
        self.triton = torch.library.custom_op(f"fastsearch::{op.name}_triton_out", self._run_triton,
                                              mutates_args=out_names, schema=f"({schema_args}, {outputs}) -> ()")
        torch.library.register_fake(self.native, self._native_fake, lib=lib)
        torch.library.register_fake(self.triton, self._triton_fake, lib=lib)

    def check_readable(self, device: torch.device, args: tuple, outs: tuple) -> None:
        check_readable(self.tensor_args, args + outs, device, dict(zip(self.out_names, self.messages, strict=True)))

    def run(self, backend: str, device: torch.device, args: tuple, outs: tuple) -> tuple:
        """Write the step into ``outs`` with the backend ``backend`` resolves to; returns ``outs``."""
        try:
            which = _backend.resolve(backend, device, self.name)
        except ValueError:
            self.check_readable(device, args, outs)
            raise
        if which == "cpu" or which == "cuda" or which == "cuda_emulated":
            kernel = self.native if which != "cuda_emulated" else _backend.emulated(self.name)
            try:
                kernel(*args, **dict(zip(self.out_names, outs, strict=True)))
            except RuntimeError:  # the dispatcher's own message for a non-tensor argument names no rule
                self.check_readable(device, args, outs)
                raise
            return outs
        self.check_readable(device, args, outs)
        self.op.check(*args)
        self.check_outs(args[0], outs)
        if which == "triton":
            self.triton(*args, *outs)
            return outs
        # The reference reads everything before it writes, so overlaps are harmless here; they are refused
        # as the kernels refuse them, except while torch.compile traces (no data pointers then).
        if not torch.compiler.is_compiling():
            self.check_overlaps(args, outs)
        results = self.op.reference(*args)
        for out, result in zip(outs, results if isinstance(results, tuple) else (results,), strict=True):
            out.copy_(result)
        return outs

    def check_outs(self, sample: torch.Tensor, outs: tuple) -> None:
        for message, out in zip(self.messages, outs, strict=True):
            _check_out(message, out, sample)

    def check_overlaps(self, args: tuple, outs: tuple) -> None:
        if outs[0].device.type == "meta":
            return
        if len(outs) == 2 and _overlap(*outs) != "none":
            raise ValueError(f"{self.messages[0]} and {self.messages[1]} must not overlap")
        for message, out in zip(self.messages, outs, strict=True):
            for name, index in self.reads:
                tensor = args[index]
                if tensor is not None and tensor.is_contiguous() and _overlap(out, tensor) == "partial":
                    raise ValueError(f"{message} overlaps {name} in part; it may be {name} itself (an in-place "
                                     "step) or memory of its own")
            for name, index in self.schedules:
                tensor = args[index]
                if tensor is not None and tensor.is_contiguous() and _overlap(out, tensor) != "none":
                    raise ValueError(f"{message} overlaps {name}, which the step reads for every element of a "
                                     "sample")

    def _run_triton(self, *args_and_outs):
        from fastsearch.kernels import steps as kernels

        # Checked here, on the tensors the kernel gets, so that a graph torch.compile reinplaced is checked too.
        count = len(self.out_names)
        self.check_overlaps(args_and_outs[:-count], args_and_outs[-count:])
        getattr(kernels, self.op.name)(*args_and_outs)

    def _native_fake(self, *args, **outs):
        outs = tuple(outs[name] for name in self.out_names)
        refuse_meta(self.tensor_args, args + outs, dict(zip(self.out_names, self.messages, strict=True)))
        self.check_outs(args[0], outs)
        return outs[0] if len(outs) == 1 else outs

    def _triton_fake(self, *args_and_outs):
        refuse_meta(self.tensor_args, args_and_outs, dict(zip(self.out_names, self.messages, strict=True)))
        count = len(self.out_names)
        self.check_outs(args_and_outs[0], args_and_outs[-count:])


_DDIM_OUT_MESSAGES = ("out[0] (prev_sample)", "out[1] (pred_original_sample)")
DDIM_STEP_OUT = _OutOp(DDIM_STEP, _DDIM_STEP_ARGS, ("prev_sample", "pred_original_sample"), _DDIM_OUT_MESSAGES,
                       reads=("sample", "model_output", "noise"), schedules=("alpha_prod_t", "alpha_prod_t_prev"))
FLOW_EULER_STEP_OUT = _OutOp(FLOW_EULER_STEP, _FLOW_EULER_STEP_ARGS, ("out",), ("out",),
                             reads=("sample", "velocity", "noise"), schedules=("sigma", "sigma_next"))
FLOW_HEUN_STEP_OUT = _OutOp(FLOW_HEUN_STEP, _FLOW_HEUN_STEP_ARGS, ("out",), ("out",),
                            reads=("sample", "velocity", "velocity_next"), schedules=("sigma", "sigma_next"))
RENOISE_OUT = _OutOp(RENOISE, _RENOISE_ARGS, ("out",), ("out",), reads=("sample", "noise"),
                     schedules=("level_from", "level_to"))


def _ddim_out_arg(out) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, tuple | list):
        raise TypeError(f"out must be a (prev_sample, pred_original_sample) pair of tensors, got {type(out).__name__}")
    if len(out) != 2:
        raise ValueError(f"out must hold 2 tensors (prev_sample, pred_original_sample), got {len(out)}")
    return tensor_arg(_DDIM_OUT_MESSAGES[0], out[0]), tensor_arg(_DDIM_OUT_MESSAGES[1], out[1])


# -- public functions ----------------------------------------------------------------------------------


def _noise_args(noise, seed, needs_noise: bool):
    """Resolve ``noise=`` / ``seed=``: a step that draws noise and got neither takes a fresh seed."""
    if seed is not None:
        seed = check_seed(seed)
    elif noise is None and needs_noise:
        seed = fresh_seed()
    return noise, seed


def ddim_step(sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t, alpha_prod_t_prev, *,
              eta: float = 0.0, noise: torch.Tensor | None = None, seed: int | None = None,
              prediction_type: str = "epsilon", clip_sample_range: float | None = None,
              use_clipped_model_output: bool = False, out: tuple[torch.Tensor, torch.Tensor] | None = None,
              backend: str = "auto") -> DDIMStepOutput:
    """One DDIM step (diffusers ``DDIMScheduler.step``) for a batch, with per-sample noise levels.

    With ``a = alpha_prod_t``, ``a' = alpha_prod_t_prev``, the model output is turned into
    ``(x0, eps)`` according to ``prediction_type``, ``x0`` is optionally clipped, and
    ``prev = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std noise`` with
    ``std = eta sqrt((1 - a') / (1 - a) (1 - a / a'))``.

    Args:
        sample: x_t, [B, ...] float32 / float16 / bfloat16.
        model_output: same shape and dtype as ``sample``.
        alpha_prod_t, alpha_prod_t_prev: float, 0-d tensor, or [B] tensor (one value per sample).
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like): a finite number >= 0.
        noise: optional Gaussian noise like ``sample`` (used where ``eta > 0``).
        seed: optional int; the kernel draws ``fastsearch.randn(sample.shape, seed=seed)`` itself.
            With ``eta > 0`` and neither given, a seed is drawn from torch's default generator.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        clip_sample_range: clip x0 to ``[-r, r]`` when given.
        use_clipped_model_output: re-derive eps from the clipped x0.
        out: optional pair of tensors ``(prev_sample, pred_original_sample)`` (a :class:`DDIMStepOutput`
            will do), each contiguous and like ``sample``, that the kernel writes into instead of allocating.
            Each may be ``sample``, ``model_output`` or ``noise`` itself (``out=(x, x0_buffer)`` updates x in
            place), but must not overlap them otherwise, nor each other.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`DDIMStepOutput` ``(prev_sample, pred_original_sample)``, each like ``sample``: the tensors of
        ``out`` when given.

    Example:
        >>> x = torch.randn(8, 4, 64, 64)
        >>> eps = model(x, t)
        >>> a = scheduler.alphas_cumprod[t]                # [8]: each sample at its own step
        >>> prev, x0 = fastsearch.ddim_step(x, eps, a, a_prev, eta=1.0, seed=0)
        >>> x0_buffer = torch.empty_like(x)
        >>> fastsearch.ddim_step(x, eps, a, a_prev, out=(x, x0_buffer))   # x updated in place
    """
    code = method_code("prediction_type", prediction_type, PREDICTION_TYPES)
    sample = tensor_arg("sample", sample)
    alpha, alpha_value = schedule_arg(alpha_prod_t, "alpha_prod_t", sample)
    alpha_prev, alpha_prev_value = schedule_arg(alpha_prod_t_prev, "alpha_prod_t_prev", sample)
    eta = eta_arg(eta)
    noise, seed = _noise_args(noise, seed, eta > 0)
    args = (sample, model_output, alpha, alpha_value, alpha_prev, alpha_prev_value, eta, noise, seed, code,
            clip_arg(clip_sample_range), bool(use_clipped_model_output))
    if out is None:
        return tuple.__new__(DDIMStepOutput, DDIM_STEP.run(backend, sample.device, *args))
    return tuple.__new__(DDIMStepOutput, DDIM_STEP_OUT.run(backend, sample.device, args, _ddim_out_arg(out)))


def flow_euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, *,
                    noise: torch.Tensor | None = None, seed: int | None = None, stochastic: bool = False,
                    out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One flow-matching Euler step (diffusers ``FlowMatchEulerDiscreteScheduler.step``).

    Deterministic: ``prev = x + (sigma_next - sigma) v``. Stochastic: ``x0 = x - sigma v``,
    ``prev = (1 - sigma_next) x0 + sigma_next noise`` (re-draws the noise part, as used for particle
    methods that need a stochastic sampler).

    Args:
        sample: x at ``sigma``, [B, ...] float32 / float16 / bfloat16.
        velocity: model velocity prediction, same shape and dtype.
        sigma, sigma_next: float, 0-d tensor, or [B] tensor.
        noise, seed: the noise of the stochastic variant (tensor like ``sample``, or an int seed; a
            seed is drawn from torch's generator when neither is given).
        stochastic: use the stochastic variant.
        out: optional contiguous tensor like ``sample`` to write the result into instead of allocating; it
            may be ``sample``, ``velocity`` or ``noise`` itself (an in-place step), and must not overlap them
            otherwise.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        prev_sample: x at ``sigma_next``, like ``sample`` (``out`` when given).

    Example:
        >>> x = fastsearch.flow_euler_step(x, model(x, s), s, s_next)
        >>> fastsearch.flow_euler_step(x, model(x, s), s, s_next, out=x)   # in place: no allocation
    """
    sample = tensor_arg("sample", sample)
    s, s_value = schedule_arg(sigma, "sigma", sample)
    s_next, s_next_value = schedule_arg(sigma_next, "sigma_next", sample)
    noise, seed = _noise_args(noise, seed, stochastic)
    args = (sample, velocity, s, s_value, s_next, s_next_value, noise, seed, bool(stochastic))
    if out is None:
        return FLOW_EULER_STEP.run(backend, sample.device, *args)
    return FLOW_EULER_STEP_OUT.run(backend, sample.device, args, (tensor_arg("out", out),))[0]


def flow_heun_step(sample: torch.Tensor, velocity: torch.Tensor, velocity_next: torch.Tensor, sigma, sigma_next,
                   *, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The Heun corrector of a flow-matching step (diffusers ``FlowMatchHeunDiscreteScheduler``).

    ``prev = x + (sigma_next - sigma) (v1 + v2) / 2`` where ``v1`` is the velocity at ``(x, sigma)`` and
    ``v2`` the velocity at the Euler predictor ``(x + (sigma_next - sigma) v1, sigma_next)``. The
    predictor is :func:`flow_euler_step`; the last step (to sigma 0) is plain Euler.

    Args:
        sample: x at ``sigma``, [B, ...] float32 / float16 / bfloat16.
        velocity: v1, same shape and dtype.
        velocity_next: v2, same shape and dtype.
        sigma, sigma_next: float, 0-d tensor, or [B] tensor.
        out: optional contiguous tensor like ``sample`` to write the result into instead of allocating; it
            may be ``sample``, ``velocity`` or ``velocity_next`` itself, and must not overlap them otherwise.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        prev_sample: the corrected x at ``sigma_next``, like ``sample`` (``out`` when given).

    Example:
        >>> v1 = model(x, s)
        >>> x_pred = fastsearch.flow_euler_step(x, v1, s, s_next)
        >>> x = fastsearch.flow_heun_step(x, v1, model(x_pred, s_next), s, s_next)
    """
    sample = tensor_arg("sample", sample)
    s, s_value = schedule_arg(sigma, "sigma", sample)
    s_next, s_next_value = schedule_arg(sigma_next, "sigma_next", sample)
    args = (sample, velocity, velocity_next, s, s_value, s_next, s_next_value)
    if out is None:
        return FLOW_HEUN_STEP.run(backend, sample.device, *args)
    return FLOW_HEUN_STEP_OUT.run(backend, sample.device, args, (tensor_arg("out", out),))[0]


def renoise(sample: torch.Tensor, level_from, level_to, *, schedule: str = "vp", noise: torch.Tensor | None = None,
            seed: int | None = None, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Forward-noise samples from a cleaner level to a noisier one, with the exact marginal.

    This is the re-noising step of search over paths.

    - ``schedule="vp"`` (levels are ``alpha_prod``, noisier = smaller):
      ``x' = sqrt(a_to / a_from) x + sqrt(1 - a_to / a_from) noise``.
    - ``schedule="flow"`` (rectified flow ``x_s = (1 - s) x0 + s noise``, levels are sigmas, noisier =
      larger): with ``c = (1 - s_to) / (1 - s_from)``, ``x' = c x + sqrt(s_to^2 - c^2 s_from^2) noise``.

    The noise variance is computed as a product of differences (``(a_from - a_to) / a_from``;
    ``(s_to - s_from) / (1 - s_from) * (s_to + c s_from)``), so that equal levels return ``sample`` bit for bit
    (no noise term is added where the variance is 0) and nearby levels lose no accuracy. Levels must lie in
    range (NaN and infinities are refused): vp ``0 < level_from <= 1``, ``0 <= level_to <= level_from``; flow
    ``0 <= level_from < 1``, ``level_from <= level_to <= 1``; ValueError otherwise (per-sample levels on a GPU
    are not checked, which would cost a device sync).

    Args:
        sample: [B, ...] float32 / float16 / bfloat16 at ``level_from``.
        level_from, level_to: float, 0-d tensor, or [B] tensor.
        schedule: ``"vp"`` or ``"flow"``.
        noise, seed: a noise tensor like ``sample`` or an int seed (drawn from torch's generator when
            neither is given).
        out: optional contiguous tensor like ``sample`` to write the result into instead of allocating; it
            may be ``sample`` or ``noise`` itself, and must not overlap them otherwise.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        the re-noised sample, like ``sample`` (``out`` when given).

    Example:
        >>> x_noisier = fastsearch.renoise(x, sigma, sigma + 0.2, schedule="flow", seed=3)
    """
    code = method_code("schedule", schedule, RENOISE_SCHEDULES)
    sample = tensor_arg("sample", sample)
    start, start_value = schedule_arg(level_from, "level_from", sample)
    end, end_value = schedule_arg(level_to, "level_to", sample)
    check_levels(code, start, start_value, end, end_value)
    noise, seed = _noise_args(noise, seed, True)
    args = (sample, start, start_value, end, end_value, code, noise, seed)
    if out is None:
        return RENOISE.run(backend, sample.device, *args)
    return RENOISE_OUT.run(backend, sample.device, args, (tensor_arg("out", out),))[0]

