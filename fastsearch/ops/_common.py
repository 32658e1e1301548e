"""Shared op machinery: the ``fastsearch`` library, argument conversion, checks, dispatch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastsearch import _backend

lib = torch.library.Library("fastsearch", "DEF")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEED = 2**63


class Op:
    """One op family member: its C++ op (CPU and CUDA keys), its Triton op, check and reference.

    ``run`` is the whole dispatch a public function pays for: pick the backend, then either call the
    C++ op (which validates in C++) or validate in Python and call the Triton op or the reference.
    """

    __slots__ = ("name", "native", "triton", "check", "reference")

    def __init__(self, name: str, triton: Callable, check: Callable, reference: Callable):
        self.name = name
        self.native = getattr(torch.ops.fastsearch, name).default
        self.triton = triton
        self.check = check
        self.reference = reference

    def run(self, backend: str, device: torch.device, *args):
        which = _backend.resolve(backend, device, self.name)
        if which == "cpu" or which == "cuda":
            return self.native(*args)
        self.check(*args)
        if which == "triton":
            return self.triton(*args)
        return self.reference(*args)


def schedule_arg(value, name: str, sample: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Turn a float, 0-d tensor or [B] tensor into the ops' ``(Tensor? t, float value)`` pair."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return None, float(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float, a 0-d tensor or a tensor of shape [B], got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
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


def seed_arg(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point():
            seed = int(seed)
        else:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def fresh_seed() -> int:
    """A seed drawn from torch's default generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64))


# -- checks for the Python backends (the C++ kernels run the same checks in C++) ---------------------


def check_data(name: str, tensor, sample: torch.Tensor) -> None:
    """``tensor`` must look exactly like ``sample``: same shape, dtype and device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype != sample.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but sample has dtype {sample.dtype}")
    if tensor.shape != sample.shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)} but sample has shape {list(sample.shape)}")
    if tensor.device != sample.device:
        raise ValueError(f"{name} is on {tensor.device} but sample is on {sample.device}")


def check_sample(sample, name: str = "sample") -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(sample).__name__}")
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


def register_fake(names: Sequence[str], fn: Callable) -> None:
    for name in names:
        torch.library.register_fake(f"fastsearch::{name}", fn, lib=lib)
