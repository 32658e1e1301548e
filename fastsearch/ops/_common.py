"""Shared op machinery: the ``fastsearch`` library, argument conversion, checks, dispatch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastsearch import _backend
from fastsearch.checks import FLOAT_DTYPES

lib = torch.library.Library("fastsearch", "DEF")


class Op:
    """One op family member: its C++ op (CPU and CUDA keys), its Triton op, check and reference.

    ``fake`` gives the output shapes of both the schema op ``name`` and the Triton custom op (FakeTensor,
    ``torch.compile``); it is registered for both here, so that no op is built without one.
    ``run`` is the whole dispatch a public function pays for: pick the backend, then either call the
    C++ op (which validates in C++) or validate in Python and call the Triton op or the reference.
    """

    __slots__ = ("name", "native", "triton", "check", "reference", "tensor_args")

    def __init__(self, name: str, triton: Callable, check: Callable, reference: Callable, fake: Callable):
        def checked_fake(*args):
            refuse_meta(self.tensor_args, args)
            return fake(*args)

        for op in (f"fastsearch::{name}", triton):
            torch.library.register_fake(op, checked_fake, lib=lib)
        self.name = name
        self.native = getattr(torch.ops.fastsearch, name).default
        self.triton = triton
        self.check = check
        self.reference = reference
        self.tensor_args = tensor_positions(self.native._schema)

    def run(self, backend: str, device: torch.device, *args):
        # The C++ ops check their tensors' devices (and refuse meta) themselves: the readable check runs in
        # Python only on the way to Triton or the reference, and to name the argument a backend cannot take.
        try:
            which = _backend.resolve(backend, device, self.name)
        except ValueError:
            check_readable(self.tensor_args, args, device)
            raise
        if which == "cpu" or which == "cuda" or which == "cuda_emulated":
            kernel = self.native if which != "cuda_emulated" else _backend.emulated(self.name)
            try:
                return kernel(*args)
            except RuntimeError:  # the dispatcher's own message for a non-tensor argument names no rule
                check_readable(self.tensor_args, args, device)
                raise
        check_readable(self.tensor_args, args, device)
        self.check(*args)
        if which == "triton":
            return self.triton(*args)
        return self.reference(*args)


def tensor_positions(schema) -> tuple[tuple[int, str, bool], ...]:
    """``(position, name, required)`` of every tensor argument of an op schema, in order."""
    found = []
    for position, argument in enumerate(schema.arguments):
        kind = str(argument.type)
        if kind in ("Tensor", "Optional[Tensor]"):
            found.append((position, argument.name, kind == "Tensor"))
    return tuple(found)


def refuse_meta(tensor_args, args, names: dict[str, str] | None = None) -> None:
    """Refuse real meta tensors where an op's fake runs (the Meta dispatch key), naming the argument.

    A C++ op called with a meta tensor among device tensors dispatches to its fake, which would hand back
    outputs with no data; torch.compile's FakeTensors (not ``is_meta``) pass.
    """
    tensors = [args[position] for position, _, _ in tensor_args if isinstance(args[position], torch.Tensor)]
    if any(tensor.is_meta for tensor in tensors):
        device = next((tensor.device for tensor in tensors if not tensor.is_meta), torch.device("meta"))
        check_readable(tensor_args, args, device, names)


def check_readable(tensor_args, args, device: torch.device, names: dict[str, str] | None = None) -> None:
    """Every tensor argument is a tensor (None only where optional) with data on ``device``.

    Run before the Triton kernels and the references (the C++ ops check the same themselves) and where the
    backend cannot take the tensors: a meta tensor (no data) or one on another device would otherwise reach a
    kernel that reads its pointer, or a fake that returns uninitialised memory. ``names``
    renames arguments in the messages (the out= outputs). TypeError / ValueError naming the argument.
    """
    first = None
    for position, name, required in tensor_args:
        tensor = args[position]
        label = names.get(name, name) if names else name
        if not isinstance(tensor, torch.Tensor):
            if tensor is None and not required:
                continue
            expected = "a tensor" if required else "a tensor or None"
            raise TypeError(f"{label} must be {expected}, got {type(tensor).__name__}")
        if tensor.device.type == "meta":
            raise ValueError(f"{label} is on meta: a meta tensor holds no data for a kernel to read (torch.compile "
                             "traces fastsearch ops through their fake implementations without one)")
        if tensor.device != device:
            where = f"{first} is on {device}" if first is not None else f"the op runs on {device}"
            raise ValueError(f"{label} is on {tensor.device} but {where}; every tensor must be on one device")
        if first is None:
            first = label


# -- arguments of the public functions ----------------------------------------------------------------


def tensor_arg(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def int_arg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def method_code(name: str, value, table: dict[str, int]) -> int:
    """The op's code for the variant named ``value`` in ``table`` (``VOTE_MODES``, ...)."""
    # strings only: a list gets this message too, not the dict's "unhashable type" TypeError
    code = table.get(value) if isinstance(value, str) else None
    if code is None:
        raise ValueError(f"{name} must be one of {list(table)}, got {value!r}")
    return code


def schedule_arg(value, name: str, sample: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Turn a float, 0-d tensor or [B] tensor into the ops' ``(Tensor? t, float value)`` pair."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        try:
            return None, float(value)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float: {value}") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float, a 0-d tensor or a tensor of shape [B], got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on meta: a meta tensor holds no data for a kernel to read")
    if value.dim() == 0:
        if value.device.type == "cpu" or value.device != sample.device:
            return None, float(value)
        return value.reshape(1).float(), 0.0
    if value.device != sample.device:
        raise ValueError(f"{name} is on {value.device} but sample is on {sample.device}; per-sample "
                         "schedule tensors must be on the sample's device")
    if value.dim() != 1:
        value = value.reshape(-1)
    if value.dtype != torch.float32:
        value = value.float()
    return value, 0.0


# -- checks for the Python backends (the C++ kernels run the same checks in C++) ---------------------


def check_data(name: str, tensor, sample: torch.Tensor) -> None:
    """``tensor`` must look exactly like ``sample``: same shape, dtype and device."""
    tensor_arg(name, tensor)
    if tensor.dtype != sample.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but sample has dtype {sample.dtype}")
    if tensor.shape != sample.shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)} but sample has shape {list(sample.shape)}")
    if tensor.device != sample.device:
        raise ValueError(f"{name} is on {tensor.device} but sample is on {sample.device}")


def check_sample(sample, name: str = "sample") -> None:
    tensor_arg(name, sample)
    if sample.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {sample.dtype}")
    if sample.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")


def check_schedule(name: str, tensor: torch.Tensor | None, sample: torch.Tensor) -> None:
    if tensor is None:
        return
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {tensor.dtype}")
    if tensor.device != sample.device:
        raise ValueError(f"{name} is on {tensor.device} but sample is on {sample.device}")
    if tensor.dim() != 1 or tensor.numel() not in (1, sample.shape[0]):
        raise ValueError(f"{name} must hold 1 or B={sample.shape[0]} values (one per sample), got shape "
                         f"{list(tensor.shape)}")


def check_noise(noise: torch.Tensor | None, seed: int | None, sample: torch.Tensor, required: bool) -> None:
    if noise is not None and seed is not None:
        raise ValueError("give noise or seed, not both")
    if noise is not None:
        check_data("noise", noise, sample)
    elif required and seed is None:
        raise ValueError("this step draws noise: pass noise= (a tensor) or seed= (an int)")


# -- reference helpers --------------------------------------------------------------------------------


def per_sample(tensor: torch.Tensor | None, value: float, like: torch.Tensor) -> torch.Tensor:
    """A schedule pair as an fp32 tensor that broadcasts over ``like`` ([B, 1, ...] or 0-d)."""
    if tensor is None:
        return torch.tensor(value, dtype=torch.float32, device=like.device)
    return tensor.float().reshape((-1,) + (1,) * (like.dim() - 1))
