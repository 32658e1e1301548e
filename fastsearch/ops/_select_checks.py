"""Argument checks the public selection and scoring functions share, before any backend is picked.

Every bad argument gets a TypeError or ValueError naming it on every backend: the compiled ops would
otherwise meet a list or a string in the dispatcher ("Expected a value of type 'Optional[Tensor]'"), and
``float("0.5")`` would quietly turn a string into a number.
"""

from __future__ import annotations

import math

import torch


def optional_tensor_arg(name: str, value) -> None:
    """None or a tensor; anything else is a TypeError naming ``name``."""
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")


def bool_arg(name: str, value) -> bool:
    """A Python bool (or a 0-d bool tensor's truth): strings such as "no" are not silently True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def finite_float_arg(name: str, value) -> float:
    """A real, finite number (int or float, not bool, not a string) as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def group_sizes(offsets: torch.Tensor, total: int, name: str = "offsets") -> torch.Tensor:
    """The group sizes of int64 offsets [G + 1], after checking their values on any device.

    ``offsets`` must start at 0, end at ``total`` and never decrease: otherwise a kernel would read
    outside the data. One read to the host (a device sync on a GPU): the Triton launchers and the
    reference read the largest size there anyway.
    """
    sizes = offsets[1:] - offsets[:-1]
    ends = torch.stack([offsets[0], offsets[-1]])
    smallest = sizes.min().reshape(1) if sizes.numel() else torch.zeros(1, dtype=sizes.dtype, device=sizes.device)
    first, last, low = torch.cat([ends, smallest]).tolist()
    if first != 0 or last != total:
        raise ValueError(f"{name} must start at 0 and end at T={total}, got {first} ... {last}")
    if low < 0:
        raise ValueError(f"{name} must be non-decreasing")
    return sizes


# Past this many entries an output's byte count (8-byte int64) no longer fits in int64.
_MAX_ENTRIES = (2**63 - 1) // 8


def check_output_width(name: str, value: int, values: torch.Tensor, offsets) -> None:
    """``value`` columns per group ([G, value] outputs: k, num_samples, refill_to) must give an output whose
    size torch can compute; otherwise a ValueError naming ``name`` (not "Storage size calculation
    overflowed" from the allocator, or a dispatcher error for a value past int64)."""
    if value < 1 << 31:  # the usual case: no group count can make this overflow
        return
    if isinstance(offsets, torch.Tensor):
        groups = max(offsets.shape[0] - 1, 1) if offsets.dim() == 1 else 1
    else:
        groups = values.shape[0] if values.dim() == 2 else 1
    if value * max(groups, 1) > _MAX_ENTRIES:
        raise ValueError(f"{name}={value} is too large: an output of {max(groups, 1)} x {value} entries does not "
                         "fit in memory addressable by int64")
