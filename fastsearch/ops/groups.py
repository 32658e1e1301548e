"""Groups of candidates, as every op over candidates lays them out: checks and reference helpers.

Groups are dense ([G, C]: G groups of C candidates) or ragged (a flat [T] tensor plus ``offsets`` [G + 1],
int64, CSR style, ``offsets[0] == 0``, ``offsets[-1] == T``). A 1-D tensor without ``offsets`` is one
group, as ``torch.topk`` treats it: the public functions run it as [1, C] (see :func:`row`) and drop the
group dimension of the results.
"""

from __future__ import annotations

import torch

from fastsearch.ops._common import tensor_arg
from fastsearch.ops._select_checks import group_sizes


def num_groups(values: torch.Tensor, offsets: torch.Tensor | None) -> int:
    """G: the rows of dense ``values``, or the groups that ``offsets`` delimit."""
    if offsets is None:
        return values.shape[0]
    return offsets.shape[0] - 1


def pad_groups(values: torch.Tensor, offsets: torch.Tensor | None, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged groups as a padded [G, Cmax] tensor plus the [G, Cmax] flat index (-1 in the padding)."""
    if offsets is None:
        groups, size = values.shape
        index = torch.arange(size, device=values.device).expand(groups, size)
        return values, index
    if offsets.device.type == "cpu":  # value-checked by check_groups
        sizes = offsets[1:] - offsets[:-1]
    else:  # checked here, in the read to the host that the width needs anyway: no read out of bounds
        sizes = group_sizes(offsets, values.shape[0])
    width = int(sizes.max()) if sizes.numel() else 0
    column = torch.arange(width, device=values.device)
    inside = column < sizes[:, None]
    index = torch.where(inside, offsets[:-1, None] + column, torch.full_like(inside, -1, dtype=torch.int64))
    filled = torch.where(inside, values[index.clamp(min=0)], torch.full((), fill, dtype=values.dtype,
                                                                         device=values.device))
    return filled, index


def row(name: str, tensor, values: torch.Tensor, values_name: str = "scores"):
    """A per-candidate companion (mask, lengths, ...) of a 1-D input as the [1, C] row the kernels see.

    Views only, so every backend runs its dense path on one group at no copy.
    """
    if not isinstance(tensor, torch.Tensor):
        return tensor  # None, or a non-tensor that the op's checks reject by name
    if tensor.shape != values.shape:
        # checked here so that the message gives the shapes the caller passed, not the [1, C] views
        raise ValueError(f"{name} has shape {list(tensor.shape)} but {values_name} has shape {list(values.shape)}")
    return tensor.unsqueeze(0)


# -- checks for the Python backends (the C++ kernels run the same checks) ------------------------------


def check_groups(name: str, values: torch.Tensor, offsets: torch.Tensor | None) -> None:
    """Dense [G, C] without offsets, or flat [T] with int64 offsets [G + 1] (0 ... T, non-decreasing).

    Offset values are checked where they live on the CPU; on a GPU that would cost a device sync.
    """
    if offsets is None:
        if values.dim() != 2:
            raise ValueError(f"{name} must be [G, C] (or flat [T] with offsets), got shape {list(values.shape)}")
        return
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be an int64 tensor, got {getattr(offsets, 'dtype', type(offsets).__name__)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must have shape [G + 1], got {list(offsets.shape)}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be flat [T] when offsets are given, got shape {list(values.shape)}")
    if offsets.device != values.device:
        raise ValueError(f"offsets is on {offsets.device} but {name} is on {values.device}")
    if offsets.device.type == "cpu":
        if offsets[0] != 0 or offsets[-1] != values.numel():
            raise ValueError(f"offsets must start at 0 and end at T={values.numel()}, got {offsets[0].item()} ... "
                             f"{offsets[-1].item()}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")


def check_like_groups(name: str, tensor, values: torch.Tensor, dtypes, kind: str) -> None:
    """An optional per-candidate companion of ``values`` (mask, lengths, keys): a dtype in ``dtypes``
    (``kind`` names them in the message), the same shape and device."""
    if tensor is None:
        return
    tensor_arg(name, tensor)
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind}, got {tensor.dtype}")
    if tensor.shape != values.shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)} but the scores have shape {list(values.shape)}")
    if tensor.device != values.device:
        raise ValueError(f"{name} is on {tensor.device} but the scores are on {values.device}")


def check_scores(name: str, scores) -> None:
    """A floating-point tensor; unlike the sampler steps' data, float64 scores are accepted."""
    tensor_arg(name, scores)
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")


def check_at_least_one(name: str, count: int) -> None:
    if count < 1:
        raise ValueError(f"{name} must be at least 1, got {count}")
