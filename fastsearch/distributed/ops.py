"""The selection and particle ops over a process group, each equal to the single-process op on the concatenated
candidates (indices bit for bit), and the particle exchange that follows resampling.

Every rank holds a contiguous shard of every group (see :mod:`fastsearch.distributed.shards`): dense [G, c]
scores (c may differ between ranks, 0 included) or flat [t] scores with local ``offsets`` [G + 1]. Each
function returns on every rank what :mod:`fastsearch.ops` returns for the global candidate list: for dense
shards, positions in the concatenated row [G, C] (C = sum of the ranks' c); for ragged shards, flat indices into
the global flat list; for a 1-D shard without offsets (one group), positions in the concatenated group.

Communication: ``segmented_topk`` and ``beam_prune`` gather each rank's local top k with its group sizes, one
all_gather of G (2k + 1) (beam_prune with keys: 3k + 1) int64 per rank, O(k W) per group, whatever the number of
candidates. ``vote``, ``effective_sample_size`` and ``resample`` gather every candidate's scalar (key, score,
log-weight: 8 to 17 bytes a candidate) and run the single-process kernel on the result on every rank, which is
what makes them exact (a float sum in another order rounds differently). ``exchange_rows`` moves only the
particle states a rank lacks, with one all_to_all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

import fastsearch
from fastsearch.distributed.shards import (
    Shards,
    all_gather_stacked,
    as_bits,
    comm_device,
    from_bits,
    gather_candidates,
    world,
)
from fastsearch.ops import BeamSelection, TopK


class _Local(NamedTuple):
    """A rank's shard seen as ragged: flat values [t], local offsets [G + 1], how to report indices."""

    dense: bool
    one_group: bool
    offsets: torch.Tensor


def _local_layout(name: str, scores, offsets) -> tuple[torch.Tensor, _Local]:
    """``scores`` as flat [t] with its local offsets (CPU int64 [G + 1])."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(scores).__name__}")
    if offsets is not None:
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
            raise TypeError(f"offsets must be an int64 tensor, got {getattr(offsets, 'dtype', type(offsets).__name__)}")
        return scores, _Local(False, False, offsets.cpu())
    if scores.dim() == 1:
        return scores, _Local(False, True, torch.tensor([0, scores.shape[0]]))
    if scores.dim() != 2:
        raise ValueError(f"{name} must be [G, c], flat [t] with offsets, or [c] (one group), got shape "
                         f"{list(scores.shape)}")
    groups, width = scores.shape
    return scores.reshape(-1), _Local(True, False, torch.arange(groups + 1) * width)


def _flat(tensor):
    return None if tensor is None else tensor.reshape(-1)


def _report(global_flat: torch.Tensor, shards: Shards, layout: _Local) -> torch.Tensor:
    """Global flat indices [G, m] (-1 kept) in the caller's convention: row-local for dense and 1-D input."""
    if not (layout.dense or layout.one_group):
        return global_flat
    starts = shards.offsets[:-1].to(global_flat.device)[:, None]
    return torch.where(global_flat >= 0, global_flat - starts, global_flat)


def _shape_result(tensors, layout: _Local):
    return [t if t is None else t.squeeze(0) for t in tensors] if layout.one_group else list(tensors)


def _merge_index(local: torch.Tensor, shards: Shards) -> torch.Tensor:
    """[G, W k] global flat index of the gathered candidates from their [W, G, k] positions within the group."""
    starts = shards.starts.to(local.device)[:, :, None] + shards.offsets[:-1].to(local.device)[None, :, None]
    merged = torch.where(local >= 0, local + starts, local)
    return merged.permute(1, 0, 2).reshape(shards.num_groups, -1)


def _position_in_group(indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    starts = offsets[:-1].to(indices.device)[:, None]
    return torch.where(indices >= 0, indices - starts, indices)


def _take(table: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``table[g, chosen[g, j]]`` with -1 kept."""
    return torch.where(chosen >= 0, table.gather(1, chosen.clamp(min=0)), chosen)


def segmented_topk(scores: torch.Tensor, k: int, *, offsets: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, largest: bool = True, group=None, backend: str = "auto") -> TopK:
    """:func:`fastsearch.segmented_topk` over the candidates of every rank of ``group``.

    Args:
        scores: this rank's shard: [G, c], flat [t] with ``offsets``, or [c] (one group).
        k, mask, largest, backend: as :func:`fastsearch.segmented_topk` (``mask`` like the local ``scores``).
        offsets: int64 [G + 1] local offsets for a ragged shard.
        group: the process group (None: the default group).

    Returns:
        :class:`~fastsearch.TopK` ``(values [G, k], indices [G, k])``, the same on every rank and equal to the
        single-process op on the concatenated candidates (ties: the lower global index).
    """
    world(group)
    flat, layout = _local_layout("scores", scores, offsets)
    local = fastsearch.segmented_topk(flat, k, offsets=layout.offsets.to(flat.device), mask=_flat(mask),
                                      largest=largest, backend=backend)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).to(flat.device)
    position = _position_in_group(local.indices, layout.offsets)
    packed = torch.cat([as_bits(local.values), position, sizes[:, None]], dim=1)
    gathered = all_gather_stacked(packed, group)  # [W, G, 2k + 1]
    shards = Shards(gathered[:, :, -1].cpu())
    values = from_bits(gathered[:, :, :k], scores.dtype).permute(1, 0, 2).reshape(shards.num_groups, -1)
    merged_index = _merge_index(gathered[:, :, k:2 * k], shards)
    best = fastsearch.segmented_topk(values, k, mask=merged_index >= 0, largest=largest, backend=backend)
    indices = _report(_take(merged_index, best.indices), shards, layout)
    return tuple.__new__(TopK, _shape_result((best.values, indices), layout))


def beam_prune(scores: torch.Tensor, k: int, *, offsets: torch.Tensor | None = None,
               finished: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
               length_penalty: float = 0.0, dedup_keys: torch.Tensor | None = None, refill_to: int | None = None,
               group=None, backend: str = "auto") -> BeamSelection:
    """:func:`fastsearch.beam_prune` over the candidates of every rank of ``group``.

    Duplicate removal (``dedup_keys``) is global: a candidate survives only if it is the best of its key over
    every rank. Exact with k per rank: a global survivor in the top k is also in its rank's local top k of local
    survivors, and a local survivor beaten by a same-key candidate elsewhere meets it among the gathered ones.

    Args:
        scores, finished, lengths, dedup_keys: this rank's shard, as in :func:`fastsearch.segmented_topk` here.
        k, length_penalty, refill_to, backend: as :func:`fastsearch.beam_prune`.
        offsets: int64 [G + 1] local offsets for a ragged shard.
        group: the process group (None: the default group).

    Returns:
        :class:`~fastsearch.BeamSelection` ``(values, indices, counts, parents)``; indices and parents in the
        global convention of the module docstring, the same on every rank.
    """
    world(group)
    flat, layout = _local_layout("scores", scores, offsets)
    local = fastsearch.beam_prune(flat, k, offsets=layout.offsets.to(flat.device), finished=_flat(finished),
                                  lengths=_flat(lengths), length_penalty=length_penalty,
                                  dedup_keys=_flat(dedup_keys), refill_to=0, backend=backend)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).to(flat.device)
    parts = [as_bits(local.values), _position_in_group(local.indices, layout.offsets)]
    if dedup_keys is not None:
        keys = _flat(dedup_keys)
        parts.append(torch.where(local.indices >= 0, keys[local.indices.clamp(min=0)] if keys.numel() else
                                 torch.zeros_like(local.indices), torch.zeros_like(local.indices)))
    gathered = all_gather_stacked(torch.cat(parts + [sizes[:, None]], dim=1), group)
    shards = Shards(gathered[:, :, -1].cpu())
    groups = shards.num_groups

    def merged(column: int) -> torch.Tensor:
        return gathered[:, :, column * k:(column + 1) * k].permute(1, 0, 2).reshape(groups, -1)

    values = from_bits(merged(0), torch.float32)
    merged_index = _merge_index(gathered[:, :, k:2 * k], shards)
    best = fastsearch.beam_prune(values, k, finished=merged_index < 0,
                                 dedup_keys=merged(2) if dedup_keys is not None else None, refill_to=refill_to,
                                 backend=backend)
    indices = _report(_take(merged_index, best.indices), shards, layout)
    parents = None if best.parents is None else _report(_take(merged_index, best.parents), shards, layout)
    return tuple.__new__(BeamSelection, _shape_result((best.values, indices, best.counts, parents), layout))


def _gather_all(name: str, scores, offsets, group, *companions):
    """The global flat list of ``scores`` and its companions, its global offsets and the layout."""
    world(group)
    flat, layout = _local_layout(name, scores, offsets)
    sizes = layout.offsets[1:] - layout.offsets[:-1]
    shards = Shards.gather(sizes, group)
    everything = [gather_candidates(flat, shards, group)]
    for companion in companions:
        everything.append(None if companion is None else
                          gather_candidates(_flat(companion), shards, group))
    return everything, shards, layout


def vote(answer_keys: torch.Tensor, scores: torch.Tensor | None = None, *, offsets: torch.Tensor | None = None,
         method: str = "majority", mask: torch.Tensor | None = None, group=None,
         backend: str = "auto") -> torch.Tensor:
    """:func:`fastsearch.vote` over the candidates of every rank of ``group``.

    Gathers every candidate's key (and score and mask), then votes with the single-process kernel on every rank:
    weighted sums are then added in exactly the single-process order.

    Returns:
        winners [G] int64 (a 0-d tensor for 1-D input), in the global convention of the module docstring.
    """
    (keys, all_scores, all_mask), shards, layout = _gather_all("answer_keys", answer_keys, offsets, group, scores,
                                                                mask)
    winners = fastsearch.vote(keys, all_scores, offsets=shards.offsets.to(keys.device), method=method,
                              mask=all_mask, backend=backend)
    out = _report(winners[:, None], shards, layout)[:, 0]
    return out.squeeze(0) if layout.one_group else out


def effective_sample_size(log_weights: torch.Tensor, *, offsets: torch.Tensor | None = None, group=None,
                          backend: str = "auto") -> torch.Tensor:
    """:func:`fastsearch.effective_sample_size` of the global groups: [G] float32 (0-d for 1-D input), the same
    bits on every rank as one process computes."""
    (weights,), shards, layout = _gather_all("log_weights", log_weights, offsets, group)
    ess = fastsearch.effective_sample_size(weights, offsets=shards.offsets.to(weights.device), backend=backend)
    return ess.squeeze(0) if layout.one_group else ess


def resample(log_weights: torch.Tensor, num_samples: int, *, offsets: torch.Tensor | None = None,
             method: str = "systematic", seed: int, group=None, backend: str = "auto") -> torch.Tensor:
    """:func:`fastsearch.resample` of the global groups: global normalisation and one shared stream of uniforms.

    Returns:
        ancestors [G, N] int64, the same on every rank: global flat indices (``g * C + j`` for dense shards, as the
        single-process op returns); [N] for 1-D input. Move the particles with :func:`exchange_rows`.
    """
    (weights,), shards, layout = _gather_all("log_weights", log_weights, offsets, group)
    ancestors = fastsearch.resample(weights, num_samples, offsets=shards.offsets.to(weights.device), method=method,
                                    seed=seed, backend=backend)
    return ancestors.squeeze(0) if layout.one_group else ancestors


def exchange_rows(states: torch.Tensor, ancestors: torch.Tensor, source: Shards, *, group=None) -> torch.Tensor:
    """After resampling, give every rank its share of the new particles: the states of its slots' ancestors.

    The new particles are the slots of ``ancestors.flatten()`` (R = G N of them); rank w takes slots
    ``[R w // W, R (w + 1) // W)`` (an equal share, within one), so the new layout is
    ``Shards.split_rows(G, N, W)``. A rank sends each other rank exactly the states it holds and that rank's
    slots need, in one all_to_all; states it holds itself are copied locally.

    Args:
        states: [t, ...] this rank's particles, in its local flat order under ``source``.
        ancestors: [G, N] (or [N]) global flat indices into the layout ``source``, the same on every rank.
        source: the layout ``states`` are in.
        group: the process group (None: the default group).

    Returns:
        [r, ...] this rank's new particles, slot order.
    """
    rank, world_size = world(group)
    wanted = ancestors.reshape(-1).cpu()
    total = wanted.numel()
    bounds = [total * w // world_size for w in range(world_size + 1)]
    owner, row = source.owners(wanted)
    destination = torch.repeat_interleave(torch.arange(world_size),
                                          torch.tensor([bounds[w + 1] - bounds[w] for w in range(world_size)]))
    mine = (owner == rank) & (destination != rank)
    send_order = torch.nonzero(mine).flatten()  # slot order, hence grouped by destination
    send_rows = row[send_order]
    send_counts = torch.bincount(destination[send_order], minlength=world_size)
    needed = torch.arange(bounds[rank], bounds[rank + 1])
    from_others = needed[owner[needed] != rank]
    receive_counts = torch.bincount(owner[from_others], minlength=world_size)
    # the received rows come grouped by source rank, each group in slot order
    arrival = from_others[torch.sort(owner[from_others], stable=True).indices]

    device = comm_device(group)
    feature_shape = tuple(states.shape[1:])
    width = 1
    for size in feature_shape:
        width *= size
    send = states[send_rows.to(states.device)].reshape(send_rows.numel(), width).to(device)
    receive = torch.empty((int(receive_counts.sum()), width), dtype=states.dtype, device=device)
    dist.all_to_all_single(receive, send, receive_counts.tolist(), send_counts.tolist(), group=group)

    out = states.new_empty((needed.numel(),) + feature_shape)
    local = owner[needed] == rank
    out[local.nonzero().flatten().to(states.device)] = states[row[needed[local]].to(states.device)]
    positions = arrival - bounds[rank]
    out[positions.to(states.device)] = receive.to(states.device).reshape((-1,) + feature_shape)
    return out
