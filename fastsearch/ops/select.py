"""Selection over groups of candidates: top-k and beam pruning, each over every group in one launch.

Groups are dense, ragged or one 1-D group, as :mod:`fastsearch.ops.groups` lays them out. Ties break toward
the lower index; NaN scores are never selected. For dense input both ops return row-local indices (like
``torch.topk(dim=-1)``); for ragged input they return indices into the flat tensor. The results are
NamedTuples with values before indices, as ``torch.topk`` returns them: :class:`TopK`,
:class:`BeamSelection` (then its per-group counts and parents).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastsearch.ops._common import Op, int_arg, lib, tensor_arg
from fastsearch.ops._select_checks import bool_arg, check_output_width, finite_float_arg, optional_tensor_arg
from fastsearch.ops.groups import (
    check_at_least_one,
    check_groups,
    check_like_groups,
    check_scores,
    num_groups,
    pad_groups,
    row,
)

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

lib.define("segmented_topk(Tensor scores, Tensor? offsets, Tensor? mask, int k, bool largest) -> (Tensor, Tensor)")
lib.define(
    "beam_prune(Tensor scores, Tensor? offsets, int k, Tensor? finished, Tensor? lengths, float length_penalty, "
    "Tensor? dedup_keys, int refill_to) -> (Tensor, Tensor, Tensor, Tensor)"
)


class TopK(NamedTuple):
    """What :func:`segmented_topk` returns: the fields of ``torch.return_types.topk``, in its order.

    Attributes:
        values: [G, k] the selected scores, best first, in the scores' dtype; -inf (+inf with
            ``largest=False``) where ``indices`` is -1.
        indices: [G, k] int64 candidate indices; -1 pads groups with fewer than k selectable entries.

    For 1-D scores without offsets (one group) both fields lose their group dimension: [k], [k].
    """

    values: torch.Tensor
    indices: torch.Tensor


class BeamSelection(NamedTuple):
    """What :func:`beam_prune` keeps: values before indices (as :class:`TopK`), then the per-group extras.

    Attributes:
        values: [G, k] float32 length-penalised scores, best first; -inf where ``indices`` is -1.
        indices: [G, k] int64 candidate indices; -1 pads groups with fewer than k survivors.
        counts: [G] int64 survivors per group (at most k).
        parents: [G, refill_to] int64 candidate index of each next-step beam (survivor j fills slots
            j, j + c, j + 2c, ... for c survivors; -1 for a group without survivors), or None.

    For 1-D scores without offsets (one group) every field loses its group dimension: [k], [k], 0-d, [n].
    """

    values: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    parents: torch.Tensor | None


# -- references ---------------------------------------------------------------------------------------


def _ordered(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Column order per row: valid entries first, larger key first, lower index first on ties."""
    by_key = torch.sort(torch.where(valid, key, torch.full_like(key, -torch.inf)), dim=-1, descending=True,
                        stable=True).indices
    by_valid = torch.sort(valid.gather(-1, by_key).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return by_key.gather(-1, by_valid)


def _take_top(values, index, valid, k, order, pad_value):
    groups, width = values.shape
    if width < k:
        extra = k - width
        order = torch.cat([order, torch.zeros(groups, extra, dtype=order.dtype, device=order.device)], dim=-1)
        chosen_valid = torch.cat([valid.gather(-1, order[:, :width]),
                                  torch.zeros(groups, extra, dtype=torch.bool, device=valid.device)], dim=-1)
    else:
        order = order[:, :k]
        chosen_valid = valid.gather(-1, order)
    if width == 0:
        chosen_values = torch.full((groups, k), pad_value, dtype=values.dtype, device=values.device)
        chosen_index = torch.full((groups, k), -1, dtype=torch.int64, device=values.device)
        return chosen_values, chosen_index
    chosen_values = torch.where(chosen_valid, values.gather(-1, order.clamp(max=width - 1)),
                                torch.full((), pad_value, dtype=values.dtype, device=values.device))
    chosen_index = torch.where(chosen_valid, index.gather(-1, order.clamp(max=width - 1)),
                               torch.full((), -1, dtype=torch.int64, device=values.device))
    return chosen_values, chosen_index


def _segmented_topk_reference(scores, offsets, mask, k, largest):
    padded, index = pad_groups(scores, offsets, 0)
    valid = (index >= 0) & ~torch.isnan(padded)
    if mask is not None:
        valid &= pad_groups(mask, offsets, False)[0]
    key = padded if padded.dtype == torch.float64 else padded.float()  # fp32 order, fp64 for float64
    key = key if largest else -key
    order = _ordered(key, valid)
    pad_value = -torch.inf if largest else torch.inf
    return _take_top(padded, index, valid, k, order, pad_value)


def _dedup_survivors(adjusted, keys, valid):
    """[G, C] bool: valid candidates that are the best (ties: first) of their key within the group."""
    same = (keys[:, :, None] == keys[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    column = torch.arange(adjusted.shape[1], device=adjusted.device)
    other_better = (adjusted[:, None, :] > adjusted[:, :, None]) | (
        (adjusted[:, None, :] == adjusted[:, :, None]) & (column[None, None, :] < column[None, :, None]))
    return valid & ~(same & other_better).any(-1)


def _beam_prune_reference(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    adjusted = scores.float()
    if lengths is not None and length_penalty != 0:
        adjusted = adjusted / lengths.float() ** length_penalty
    padded, index = pad_groups(adjusted, offsets, 0.0)
    valid = (index >= 0) & ~torch.isnan(padded)
    if finished is not None:
        valid &= ~pad_groups(finished, offsets, True)[0]
    if dedup_keys is not None:
        valid = _dedup_survivors(padded, pad_groups(dedup_keys, offsets, 0)[0], valid)
    values, indices = _take_top(padded, index, valid, k, _ordered(padded, valid), -torch.inf)
    counts = (indices >= 0).sum(-1)
    slot = torch.arange(refill_to, device=scores.device)
    survivor = slot[None, :] % counts.clamp(min=1)[:, None]
    parents = torch.where(counts[:, None] > 0, indices.gather(-1, survivor.clamp(max=k - 1)),
                          torch.full((), -1, dtype=torch.int64, device=scores.device))
    return indices, values, counts, parents


# -- checks for the Python backends (the C++ kernels run the same checks) ------------------------------


def _check_segmented_topk(scores, offsets, mask, k, largest):
    check_scores("scores", scores)
    check_groups("scores", scores, offsets)
    check_like_groups("mask", mask, scores, (torch.bool,), "bool")
    check_at_least_one("k", k)


def _check_beam_prune(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    check_scores("scores", scores)
    check_groups("scores", scores, offsets)
    check_at_least_one("k", k)
    check_like_groups("finished", finished, scores, (torch.bool,), "bool")
    check_like_groups("lengths", lengths, scores, _INT_DTYPES + (torch.float32, torch.float64), "numeric")
    check_like_groups("dedup_keys", dedup_keys, scores, (torch.int64,), "int64")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    if refill_to < 0:
        raise ValueError(f"refill_to must be non-negative, got {refill_to}")


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::segmented_topk_triton", mutates_args=())
def _segmented_topk_triton(scores: torch.Tensor, offsets: torch.Tensor | None, mask: torch.Tensor | None, k: int,
                           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastsearch.kernels import select as kernels

    return kernels.segmented_topk(scores, offsets, mask, k, largest)


@torch.library.custom_op("fastsearch::beam_prune_triton", mutates_args=())
def _beam_prune_triton(scores: torch.Tensor, offsets: torch.Tensor | None, k: int, finished: torch.Tensor | None,
                       lengths: torch.Tensor | None, length_penalty: float, dedup_keys: torch.Tensor | None,
                       refill_to: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastsearch.kernels import select as kernels

    return kernels.beam_prune(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to)


def _topk_fake(scores, offsets, mask, k, largest):
    groups = num_groups(scores, offsets)
    return scores.new_empty((groups, k)), scores.new_empty((groups, k), dtype=torch.int64)


def _beam_prune_fake(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    groups = num_groups(scores, offsets)
    return (scores.new_empty((groups, k), dtype=torch.int64), scores.new_empty((groups, k), dtype=torch.float32),
            scores.new_empty((groups,), dtype=torch.int64), scores.new_empty((groups, refill_to), dtype=torch.int64))


SEGMENTED_TOPK = Op("segmented_topk", _segmented_topk_triton, _check_segmented_topk, _segmented_topk_reference,
                    _topk_fake)
BEAM_PRUNE = Op("beam_prune", _beam_prune_triton, _check_beam_prune, _beam_prune_reference, _beam_prune_fake)


# -- public functions ----------------------------------------------------------------------------------


def segmented_topk(scores: torch.Tensor, k: int, *, offsets: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, largest: bool = True, backend: str = "auto") -> TopK:
    """Top-k of every group in one launch.

    Dense ``scores`` [G, C] behaves like ``torch.topk(scores, k, dim=-1)`` (sorted, row-local indices);
    ragged ``scores`` [T] with ``offsets`` [G + 1] returns indices into the flat tensor; 1-D ``scores`` [C]
    without ``offsets`` is one group, as in ``torch.topk(scores, k)``. A group with fewer than k selectable
    entries is padded with index -1 and value -inf (+inf when ``largest=False``). Masked-out (``mask``
    False) and NaN entries are never selected; ties go to the lower index.

    Args:
        scores: [G, C], [T] with ``offsets``, or [C] (one group); float32 / float16 / bfloat16 / float64.
        k: entries per group, >= 1 (may exceed a group's size).
        offsets: int64 [G + 1] for ragged groups.
        mask: bool like ``scores``; False entries are not selectable.
        largest: pick the largest (True) or smallest values.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`TopK` ``(values [G, k]`` with the scores' dtype, ``indices [G, k]`` int64``)``, the order of
        ``torch.topk``; for 1-D ``scores`` [C] without offsets ``(values [k], indices [k])``, indices into
        ``scores``.

    Example:
        >>> scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
        >>> fastsearch.segmented_topk(scores, 2, offsets=torch.tensor([0, 3, 5]))
        TopK(values=tensor([[0.9000, 0.5000], [0.7000, 0.2000]]), indices=tensor([[1, 2], [3, 4]]))
    """
    k = int_arg("k", k)
    device = tensor_arg("scores", scores).device
    optional_tensor_arg("offsets", offsets)
    optional_tensor_arg("mask", mask)
    largest = bool_arg("largest", largest)
    check_output_width("k", k, scores, offsets)
    if offsets is None and scores.dim() == 1:
        values, indices = SEGMENTED_TOPK.run(backend, device, scores.unsqueeze(0), None, row("mask", mask, scores),
                                             k, largest)
        return tuple.__new__(TopK, (values.squeeze(0), indices.squeeze(0)))
    return tuple.__new__(TopK, SEGMENTED_TOPK.run(backend, device, scores, offsets, mask, k, largest))


def beam_prune(scores: torch.Tensor, k: int, *, offsets: torch.Tensor | None = None,
               finished: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
               length_penalty: float = 0.0, dedup_keys: torch.Tensor | None = None, refill_to: int | None = None,
               backend: str = "auto") -> BeamSelection:
    """One beam-search selection step for every group (problem) of a batch, in one launch.

    In one pass: drops ``finished`` candidates, keeps only the best-scoring candidate of each
    ``dedup_keys`` value within a group, divides scores by ``lengths ** length_penalty``, takes the top
    ``k`` per group and, with ``refill_to=n``, lays out the next step's n beams by repeating the c
    survivors in order (survivor j fills slots j, j + c, j + 2c, ...), as step-level beam search does.

    Args:
        scores: [G, C], flat [T] with ``offsets`` [G + 1], or [C] (one group); float.
        k: survivors per group (beams / beam width), >= 1.
        offsets: int64 [G + 1] for ragged groups.
        finished: bool like ``scores``; True candidates leave the pool.
        lengths: numeric like ``scores``; with ``length_penalty`` p the score is ``score / length ** p``.
        length_penalty: a finite float (NaN or inf is a ValueError).
        dedup_keys: int64 like ``scores`` (e.g. :func:`sequence_keys`); equal keys in a group are
            duplicates, of which only the best (first on ties) survives.
        refill_to: n beams for the next step, or None.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`BeamSelection` ``(values [G, k], indices [G, k], counts [G], parents [G, n] or None)``:
        values before indices, as in :class:`TopK`. Indices are row-local for dense input and flat for
        ragged input. For 1-D ``scores`` [C] without offsets the group dimension is dropped:
        ``(values [k], indices [k], counts 0-d, parents [n])``.

    Example:
        >>> scores = torch.tensor([0.5, 0.9, 0.1, 0.8, 0.3])
        >>> fastsearch.beam_prune(scores, 2, offsets=torch.tensor([0, 3, 5]), refill_to=3)
        BeamSelection(values=tensor([[0.9000, 0.5000], [0.8000, 0.3000]]), indices=tensor([[1, 0], [3, 4]]),
                      counts=tensor([2, 2]), parents=tensor([[1, 0, 1], [3, 4, 3]]))
    """
    # A search calls this every step: the plain cases take no function calls (the checks are the same).
    if type(k) is not int:
        k = int_arg("k", k)
    if refill_to is None:
        refill = 0
    else:
        refill = refill_to if type(refill_to) is int else int_arg("refill_to", refill_to)
    device = scores.device if type(scores) is torch.Tensor else tensor_arg("scores", scores).device
    if type(length_penalty) is not float or not -math.inf < length_penalty < math.inf:
        length_penalty = finite_float_arg("length_penalty", length_penalty)
    if not (offsets is finished is lengths is dedup_keys is None):
        for name, value in (("offsets", offsets), ("finished", finished), ("lengths", lengths),
                            ("dedup_keys", dedup_keys)):
            optional_tensor_arg(name, value)
    check_output_width("k", k, scores, offsets)
    check_output_width("refill_to", refill, scores, offsets)
    if offsets is None and scores.dim() == 1:
        return _beam_prune_one_group(backend, device, scores, k, finished, lengths, length_penalty,
                                     dedup_keys, refill, refill_to is not None)
    # the op returns (indices, values, counts, parents); the result puts values first
    indices, values, counts, parents = BEAM_PRUNE.run(backend, device, scores, offsets, k, finished, lengths,
                                                      length_penalty, dedup_keys, refill)
    return tuple.__new__(BeamSelection, (values, indices, counts, None if refill_to is None else parents))


def _beam_prune_one_group(backend, device, scores, k, finished, lengths, length_penalty, dedup_keys, refill,
                          with_parents) -> BeamSelection:
    """:func:`beam_prune` of a 1-D ``scores`` [C] as the one group [1, C], group dimension dropped."""
    indices, values, counts, parents = BEAM_PRUNE.run(
        backend, device, scores.unsqueeze(0), None, k, row("finished", finished, scores),
        row("lengths", lengths, scores), length_penalty, row("dedup_keys", dedup_keys, scores), refill)
    return tuple.__new__(BeamSelection, (values.squeeze(0), indices.squeeze(0), counts.squeeze(0),
                                         parents.squeeze(0) if with_parents else None))
