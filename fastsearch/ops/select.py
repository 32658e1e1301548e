"""Selection over groups of candidates: top-k, beam pruning, resampling, ESS, voting, sequence keys.

Groups are dense ([G, C]: G groups of C candidates) or ragged (a flat [T] tensor plus ``offsets`` [G + 1],
int64, CSR style, ``offsets[0] == 0``, ``offsets[-1] == T``). Each op handles every group of a batch in
one kernel launch. Ties break toward the lower index; NaN scores are never selected.

Index convention: for dense input, ``segmented_topk``, ``beam_prune`` and ``vote`` return row-local
indices (like ``torch.topk(dim=-1)``); for ragged input they return indices into the flat tensor.
``resample`` always returns flat indices (``g * C + j`` for dense input), ready to gather particles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsearch.ops._common import Op, lib, register_fake, seed_arg
from fastsearch.ops.noise import philox_uniforms

RESAMPLE_METHODS = {"multinomial": 0, "systematic": 1, "stratified": 2, "residual": 3}
VOTE_MODES = {"majority": 0, "weighted": 1, "max": 2}
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

lib.define("segmented_topk(Tensor scores, Tensor? offsets, Tensor? mask, int k, bool largest) -> (Tensor, Tensor)")
lib.define(
    "beam_prune(Tensor scores, Tensor? offsets, int k, Tensor? finished, Tensor? lengths, float length_penalty, "
    "Tensor? dedup_keys, int refill_to) -> (Tensor, Tensor, Tensor, Tensor)"
)
lib.define("resample(Tensor log_weights, Tensor? offsets, int num_samples, int method, int seed) -> Tensor")
lib.define("effective_sample_size(Tensor log_weights, Tensor? offsets) -> Tensor")
lib.define("vote(Tensor answer_keys, Tensor? scores, Tensor? offsets, Tensor? mask, int mode) -> Tensor")
lib.define("sequence_keys(Tensor token_ids, Tensor offsets) -> Tensor")


class BeamSelection(NamedTuple):
    """What :func:`beam_prune` keeps.

    Attributes:
        indices: [G, k] int64 candidate indices, best first; -1 pads groups with fewer than k survivors.
        values: [G, k] float32 length-penalised scores; -inf where ``indices`` is -1.
        counts: [G] int64 survivors per group (at most k).
        parents: [G, refill_to] int64 candidate index of each next-step beam (survivor j fills slots
            j, j + c, j + 2c, ... for c survivors; -1 for a group without survivors), or None.
    """

    indices: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    parents: torch.Tensor | None


# -- group layout helpers for the references -----------------------------------------------------------


def _padded(values: torch.Tensor, offsets: torch.Tensor | None, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged groups as a padded [G, Cmax] tensor plus the [G, Cmax] flat index (-1 in the padding)."""
    if offsets is None:
        groups, size = values.shape
        index = torch.arange(size, device=values.device).expand(groups, size)
        return values, index
    sizes = offsets[1:] - offsets[:-1]
    width = int(sizes.max()) if sizes.numel() else 0
    column = torch.arange(width, device=values.device)
    inside = column < sizes[:, None]
    index = torch.where(inside, offsets[:-1, None] + column, torch.full_like(inside, -1, dtype=torch.int64))
    padded = torch.where(inside, values[index.clamp(min=0)], torch.full((), fill, dtype=values.dtype,
                                                                         device=values.device))
    return padded, index


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


# -- references ---------------------------------------------------------------------------------------


def _segmented_topk_reference(scores, offsets, mask, k, largest):
    padded, index = _padded(scores, offsets, 0)
    valid = (index >= 0) & ~torch.isnan(padded)
    if mask is not None:
        valid &= _padded(mask, offsets, False)[0]
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
    padded, index = _padded(adjusted, offsets, 0.0)
    valid = (index >= 0) & ~torch.isnan(padded)
    if finished is not None:
        valid &= ~_padded(finished, offsets, True)[0]
    if dedup_keys is not None:
        valid = _dedup_survivors(padded, _padded(dedup_keys, offsets, 0)[0], valid)
    values, indices = _take_top(padded, index, valid, k, _ordered(padded, valid), -torch.inf)
    counts = (indices >= 0).sum(-1)
    slot = torch.arange(refill_to, device=scores.device)
    survivor = slot[None, :] % counts.clamp(min=1)[:, None]
    parents = torch.where(counts[:, None] > 0, indices.gather(-1, survivor.clamp(max=k - 1)),
                          torch.full((), -1, dtype=torch.int64, device=scores.device))
    return indices, values, counts, parents


def _normalised_weights(log_weights, offsets):
    """Per-group normalised weights [G, Cmax] (0 in padding) and the flat index, in fp32."""
    padded, index = _padded(log_weights.float(), offsets, -torch.inf)
    padded = torch.where(index >= 0, padded, torch.full_like(padded, -torch.inf))
    top = padded.max(dim=-1, keepdim=True).values if padded.shape[1] else padded.new_full((padded.shape[0], 1),
                                                                                          -torch.inf)
    weights = torch.exp(padded - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    return weights, index, top.squeeze(-1)


def _resample_reference(log_weights, offsets, num_samples, method, seed):
    if offsets is None:  # resample reports flat indices for dense input too
        groups, size = log_weights.shape
        offsets = torch.arange(0, (groups + 1) * size, size, device=log_weights.device)
        log_weights = log_weights.reshape(-1)
    weights, index, _ = _normalised_weights(log_weights, offsets)
    groups = weights.shape[0]
    weights = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cumsum(weights, dim=-1)
    # The last candidate with weight ends the CDF at exactly 1, so no draw lands past it on rounding.
    column = torch.arange(weights.shape[1], device=weights.device)
    last = torch.where(weights > 0, column, torch.full_like(column, -1)).max(dim=-1, keepdim=True).values
    cdf = torch.where(column >= last, torch.ones_like(cdf), cdf)
    uniforms = philox_uniforms(groups * num_samples, seed, log_weights.device).view(groups, num_samples)
    slot = torch.arange(num_samples, device=weights.device, dtype=torch.float32)
    if method == 0:
        positions = uniforms
    elif method == 1:
        positions = (uniforms[:, :1] + slot) / num_samples
    elif method == 2:
        positions = (uniforms + slot) / num_samples
    else:
        return _residual_reference(weights, index, uniforms, num_samples)
    # (U + i) / N may round to 1.0: such a draw takes the last candidate with weight.
    chosen = torch.minimum(torch.searchsorted(cdf, positions.contiguous(), right=True), last)
    return index.gather(-1, chosen)


def _residual_reference(weights, index, uniforms, num_samples):
    expected = weights * num_samples
    copies = torch.floor(expected)
    residual = expected - copies
    remainder = num_samples - copies.sum(-1, keepdim=True)
    cdf = torch.cumsum(residual / residual.sum(-1, keepdim=True).clamp(min=1e-30), dim=-1)
    column = torch.arange(weights.shape[1], device=weights.device)
    last = torch.where(residual > 0, column, torch.full_like(column, -1)).max(dim=-1, keepdim=True).values
    cdf = torch.where(column >= last, torch.ones_like(cdf), cdf)
    drawn = torch.minimum(torch.searchsorted(cdf, uniforms.contiguous(), right=True), last.clamp(min=0))
    out = torch.empty((weights.shape[0], num_samples), dtype=torch.int64, device=weights.device)
    for g in range(weights.shape[0]):  # the reference may loop; the kernels do not
        deterministic = torch.repeat_interleave(column, copies[g].long())
        extra = drawn[g, : int(remainder[g])]
        out[g] = index[g][torch.cat([deterministic, extra])]
    return out


def _effective_sample_size_reference(log_weights, offsets):
    weights, _, top = _normalised_weights(log_weights, offsets)
    total = weights.sum(-1)
    ess = total * total / (weights * weights).sum(-1)
    return torch.where(torch.isfinite(top), ess, torch.zeros_like(ess))


def _vote_reference(answer_keys, scores, offsets, mask, mode):
    keys, index = _padded(answer_keys, offsets, 0)
    valid = index >= 0
    if mask is not None:
        valid &= _padded(mask, offsets, False)[0]
    if scores is not None:
        padded_scores = _padded(scores.float(), offsets, 0.0)[0]
        if mode != 0:
            valid &= ~torch.isnan(padded_scores)
    groups, width = keys.shape
    if width == 0:
        return torch.full((groups,), -1, dtype=torch.int64, device=keys.device)
    same = (keys[:, :, None] == keys[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    column = torch.arange(width, device=keys.device)
    # first member of each candidate's answer
    first = torch.where(same, column[None, None, :], torch.full_like(column, width)).min(-1).values
    if mode == 0:
        count = same.sum(-1)
        occurrence = (same & (column[None, None, :] <= column[None, :, None])).sum(-1)
        best = torch.where(valid, count, torch.full_like(count, -1)).max(-1, keepdim=True).values
        reaches = valid & (occurrence == best)
        winner = torch.where(reaches, column, torch.full_like(column, width)).min(-1).values
    elif mode == 1:
        total = torch.where(same, padded_scores[:, None, :], torch.zeros((), device=keys.device)).sum(-1)
        total = torch.where(valid, total, torch.full_like(total, -torch.inf))
        best = total.max(-1, keepdim=True).values
        winner = torch.where(valid & (total == best), first, torch.full_like(first, width)).min(-1).values
    else:
        best_score = torch.where(valid, padded_scores, torch.full_like(padded_scores, -torch.inf))
        top = best_score.max(-1, keepdim=True).values
        winner = torch.where(valid & (best_score == top), column, torch.full_like(column, width)).min(-1).values
    has_any = valid.any(-1)
    winner_first = first.gather(-1, winner.clamp(max=width - 1)[:, None]).squeeze(-1)
    return torch.where(has_any, index.gather(-1, winner_first.clamp(max=width - 1)[:, None]).squeeze(-1),
                       torch.full_like(winner, -1))


_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


SEQUENCE_KEY_TOKEN = _as_int64(0x9E3779B97F4A7C15)
SEQUENCE_KEY_POSITION = _as_int64(0xC2B2AE3D27D4EB4F)
_MIX_A = _as_int64(0xBF58476D1CE4E5B9)
_MIX_B = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    x = (x ^ _shift_right(x, 30)) * _MIX_A
    x = (x ^ _shift_right(x, 27)) * _MIX_B
    return x ^ _shift_right(x, 31)


def _sequence_keys_reference(token_ids, offsets):
    tokens = token_ids.long()
    sizes = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(sizes.numel(), device=tokens.device), sizes)
    position = torch.arange(tokens.numel(), device=tokens.device) - offsets[:-1][owner]
    terms = _mix64(tokens * SEQUENCE_KEY_TOKEN + position * SEQUENCE_KEY_POSITION + 1)
    total = torch.zeros(sizes.numel(), dtype=torch.int64, device=tokens.device).index_add_(0, owner, terms)
    return _mix64(total ^ sizes)


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


def _check_like_groups(name: str, tensor, values: torch.Tensor, dtypes, kind: str) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind}, got {tensor.dtype}")
    if tensor.shape != values.shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)} but the scores have shape {list(values.shape)}")
    if tensor.device != values.device:
        raise ValueError(f"{name} is on {tensor.device} but the scores are on {values.device}")


def _check_scores(name: str, scores) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(scores).__name__}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")


def _check_k(name: str, k: int) -> None:
    if k < 1:
        raise ValueError(f"{name} must be at least 1, got {k}")


def _check_segmented_topk(scores, offsets, mask, k, largest):
    _check_scores("scores", scores)
    check_groups("scores", scores, offsets)
    _check_like_groups("mask", mask, scores, (torch.bool,), "bool")
    _check_k("k", k)


def _check_beam_prune(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    _check_scores("scores", scores)
    check_groups("scores", scores, offsets)
    _check_k("k", k)
    _check_like_groups("finished", finished, scores, (torch.bool,), "bool")
    _check_like_groups("lengths", lengths, scores, _INT_DTYPES + (torch.float32, torch.float64), "numeric")
    _check_like_groups("dedup_keys", dedup_keys, scores, (torch.int64,), "int64")
    if refill_to < 0:
        raise ValueError(f"refill_to must be non-negative, got {refill_to}")


def _check_log_weights(log_weights, offsets):
    _check_scores("log_weights", log_weights)
    check_groups("log_weights", log_weights, offsets)


def _check_resample(log_weights, offsets, num_samples, method, seed):
    _check_log_weights(log_weights, offsets)
    _check_k("num_samples", num_samples)
    if method not in (0, 1, 2, 3):
        raise ValueError(f"method must be 0..3, got {method}")
    weights = log_weights.reshape(-1) if offsets is None else log_weights
    if bool(torch.isnan(weights).any()):
        raise ValueError("log_weights contain NaN")
    groups = _padded(log_weights, offsets, -torch.inf)[0] if offsets is not None else log_weights
    alive = (groups > -torch.inf).any(-1) if groups.shape[-1] else torch.zeros(groups.shape[0], dtype=torch.bool)
    if not bool(alive.all()):
        dead = int(torch.nonzero(~alive)[0])
        raise ValueError(f"group {dead} has no candidate with finite log-weight (all -inf or empty): "
                         "nothing to resample from")


def _check_effective_sample_size(log_weights, offsets):
    _check_log_weights(log_weights, offsets)


def _check_vote(answer_keys, scores, offsets, mask, mode):
    if not isinstance(answer_keys, torch.Tensor) or answer_keys.dtype != torch.int64:
        raise TypeError(f"answer_keys must be an int64 tensor, got {getattr(answer_keys, 'dtype', answer_keys)}")
    check_groups("answer_keys", answer_keys, offsets)
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (majority), 1 (weighted) or 2 (max), got {mode}")
    if mode != 0 and scores is None:
        raise ValueError("weighted and max voting need scores")
    if scores is not None:
        _check_scores("scores", scores)
        _check_like_groups("scores", scores, answer_keys, (scores.dtype,), "floating-point")
    _check_like_groups("mask", mask, answer_keys, (torch.bool,), "bool")


def _check_sequence_keys(token_ids, offsets):
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_ids must be an int64 or int32 tensor, got {getattr(token_ids, 'dtype', token_ids)}")
    if offsets is None:
        raise ValueError("sequence_keys needs offsets")
    check_groups("token_ids", token_ids, offsets)


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


@torch.library.custom_op("fastsearch::resample_triton", mutates_args=())
def _resample_triton(log_weights: torch.Tensor, offsets: torch.Tensor | None, num_samples: int, method: int,
                     seed: int) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.resample(log_weights, offsets, num_samples, method, seed)


@torch.library.custom_op("fastsearch::effective_sample_size_triton", mutates_args=())
def _effective_sample_size_triton(log_weights: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.effective_sample_size(log_weights, offsets)


@torch.library.custom_op("fastsearch::vote_triton", mutates_args=())
def _vote_triton(answer_keys: torch.Tensor, scores: torch.Tensor | None, offsets: torch.Tensor | None,
                 mask: torch.Tensor | None, mode: int) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.vote(answer_keys, scores, offsets, mask, mode)


@torch.library.custom_op("fastsearch::sequence_keys_triton", mutates_args=())
def _sequence_keys_triton(token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.sequence_keys(token_ids, offsets)


def _num_groups(values, offsets):
    if offsets is None:
        return values.shape[0]
    return offsets.shape[0] - 1


def _topk_fake(scores, offsets, mask, k, largest):
    groups = _num_groups(scores, offsets)
    return scores.new_empty((groups, k)), scores.new_empty((groups, k), dtype=torch.int64)


def _beam_prune_fake(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    groups = _num_groups(scores, offsets)
    return (scores.new_empty((groups, k), dtype=torch.int64), scores.new_empty((groups, k), dtype=torch.float32),
            scores.new_empty((groups,), dtype=torch.int64), scores.new_empty((groups, refill_to), dtype=torch.int64))


def _resample_fake(log_weights, offsets, num_samples, method, seed):
    return log_weights.new_empty((_num_groups(log_weights, offsets), num_samples), dtype=torch.int64)


def _ess_fake(log_weights, offsets):
    return log_weights.new_empty((_num_groups(log_weights, offsets),), dtype=torch.float32)


def _vote_fake(answer_keys, scores, offsets, mask, mode):
    return answer_keys.new_empty((_num_groups(answer_keys, offsets),))


def _sequence_keys_fake(token_ids, offsets):
    return token_ids.new_empty((offsets.shape[0] - 1,), dtype=torch.int64)


register_fake(["segmented_topk", "segmented_topk_triton"], _topk_fake)
register_fake(["beam_prune", "beam_prune_triton"], _beam_prune_fake)
register_fake(["resample", "resample_triton"], _resample_fake)
register_fake(["effective_sample_size", "effective_sample_size_triton"], _ess_fake)
register_fake(["vote", "vote_triton"], _vote_fake)
register_fake(["sequence_keys", "sequence_keys_triton"], _sequence_keys_fake)

SEGMENTED_TOPK = Op("segmented_topk", _segmented_topk_triton, _check_segmented_topk, _segmented_topk_reference)
BEAM_PRUNE = Op("beam_prune", _beam_prune_triton, _check_beam_prune, _beam_prune_reference)
RESAMPLE = Op("resample", _resample_triton, _check_resample, _resample_reference)
EFFECTIVE_SAMPLE_SIZE = Op("effective_sample_size", _effective_sample_size_triton, _check_effective_sample_size,
                           _effective_sample_size_reference)
VOTE = Op("vote", _vote_triton, _check_vote, _vote_reference)
SEQUENCE_KEYS = Op("sequence_keys", _sequence_keys_triton, _check_sequence_keys, _sequence_keys_reference)


# -- public functions ----------------------------------------------------------------------------------


def _int_arg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _device_of(name: str, value) -> torch.device:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    return value.device


def segmented_topk(scores: torch.Tensor, k: int, *, offsets: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, largest: bool = True,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every group in one launch.

    Dense ``scores`` [G, C] behaves like ``torch.topk(scores, k, dim=-1)`` (sorted, row-local indices);
    ragged ``scores`` [T] with ``offsets`` [G + 1] returns indices into the flat tensor. A group with fewer
    than k selectable entries is padded with index -1 and value -inf (+inf when ``largest=False``).
    Masked-out (``mask`` False) and NaN entries are never selected; ties go to the lower index.

    Args:
        scores: [G, C] or [T] float32 / float16 / bfloat16 / float64.
        k: entries per group, >= 1 (may exceed a group's size).
        offsets: int64 [G + 1] for ragged groups.
        mask: bool like ``scores``; False entries are not selectable.
        largest: pick the largest (True) or smallest values.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``(values [G, k]`` with the scores' dtype, ``indices [G, k]`` int64``)``.

    Example:
        >>> scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
        >>> fastsearch.segmented_topk(scores, 2, offsets=torch.tensor([0, 3, 5]))
        (tensor([[0.9000, 0.5000], [0.7000, 0.2000]]), tensor([[1, 2], [3, 4]]))
    """
    k = _int_arg("k", k)
    return SEGMENTED_TOPK.run(backend, _device_of("scores", scores), scores, offsets, mask, k, bool(largest))


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
        scores: [G, C] or flat [T] with ``offsets`` [G + 1]; float.
        k: survivors per group (beams / beam width), >= 1.
        finished: bool like ``scores``; True candidates leave the pool.
        lengths: numeric like ``scores``; with ``length_penalty`` p the score is ``score / length ** p``.
        dedup_keys: int64 like ``scores`` (e.g. :func:`sequence_keys`); equal keys in a group are
            duplicates, of which only the best (first on ties) survives.
        refill_to: n beams for the next step, or None.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`BeamSelection` ``(indices [G, k], values [G, k], counts [G], parents [G, n] or None)``;
        indices are row-local for dense input and flat for ragged input.
    """
    # A search calls this every step: the plain cases take no function calls (the checks are the same).
    if type(k) is not int:
        k = _int_arg("k", k)
    if refill_to is None:
        refill = 0
    else:
        refill = refill_to if type(refill_to) is int else _int_arg("refill_to", refill_to)
    device = scores.device if type(scores) is torch.Tensor else _device_of("scores", scores)
    selection = BEAM_PRUNE.run(backend, device, scores, offsets, k, finished, lengths, float(length_penalty),
                               dedup_keys, refill)
    if refill_to is None:
        return BeamSelection(selection[0], selection[1], selection[2], None)
    return tuple.__new__(BeamSelection, selection)  # the op's four outputs as they are


def resample(log_weights: torch.Tensor, num_samples: int, *, method: str = "systematic",
             offsets: torch.Tensor | None = None, seed: int, backend: str = "auto") -> torch.Tensor:
    """Draw ``num_samples`` ancestors per group from normalised weights ``softmax(log_weights)``.

    Methods: ``multinomial`` (iid draws, in draw order), ``systematic`` (one uniform per group, sorted),
    ``stratified`` (one uniform per stratum, sorted), ``residual`` (``floor(N w)`` copies of each
    candidate in index order, then the remainder drawn multinomially from the residual weights).
    Uniforms come from the Philox stream of ``seed`` (position ``g * num_samples + i``), so a seed gives
    the same ancestors on every backend (up to rounding at CDF boundaries).

    Args:
        log_weights: [G, C] or flat [T] with ``offsets`` [G + 1]; float. A group whose weights are all
            -inf (or that is empty) is an error; NaN is an error.
        num_samples: ancestors per group (N).
        method: see above.
        seed: int.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ancestors [G, N] int64, indices into the flat tensor (``g * C + j`` for dense input).
    """
    code = RESAMPLE_METHODS.get(method)
    if code is None:
        raise ValueError(f"method must be one of {list(RESAMPLE_METHODS)}, got {method!r}")
    num_samples = _int_arg("num_samples", num_samples)
    return RESAMPLE.run(backend, _device_of("log_weights", log_weights), log_weights, offsets, num_samples, code,
                        seed_arg(seed))


def effective_sample_size(log_weights: torch.Tensor, *, offsets: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` per group, with ``w = exp(log_weights)``.

    Args:
        log_weights: [G, C] or flat [T] with ``offsets`` [G + 1]; float.

    Returns:
        [G] float32; 0 for a group with no finite weight.
    """
    return EFFECTIVE_SAMPLE_SIZE.run(backend, _device_of("log_weights", log_weights), log_weights, offsets)


def vote(answer_keys: torch.Tensor, scores: torch.Tensor | None = None, *, mode: str = "majority",
         offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Pick one answer per group: majority, weighted (sum of scores) or max (best single score).

    ``majority``: the answer with most members wins; on a tie, the answer that reaches the top count
    first in candidate order. ``weighted``: the largest sum of scores wins (ties: the answer seen
    first). ``max``: the answer holding the best single score (ties: lower index). The winner is
    reported as the index of the first candidate of the winning answer. Masked-out candidates (and
    NaN scores, for weighted and max) do not vote; a group with no voter gives -1.

    Args:
        answer_keys: int64 [G, C] or flat [T] with ``offsets`` (e.g. :func:`sequence_keys` of answers).
        scores: float like ``answer_keys``; needed for ``weighted`` and ``max``.
        mode: ``"majority"``, ``"weighted"`` or ``"max"``.
        mask: bool like ``answer_keys``.

    Returns:
        winners [G] int64: row-local for dense input, flat for ragged input.
    """
    code = VOTE_MODES.get(mode)
    if code is None:
        raise ValueError(f"mode must be one of {list(VOTE_MODES)}, got {mode!r}")
    return VOTE.run(backend, _device_of("answer_keys", answer_keys), answer_keys, scores, offsets, mask, code)


def sequence_keys(token_ids: torch.Tensor, offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """A 64-bit key per ragged token sequence, for exact-duplicate detection and answer grouping.

    ``key = mix(len ^ sum_p mix(token_p * A + p * B + 1))`` with the splitmix64 finaliser ``mix`` and
    wrapping 64-bit arithmetic (order-aware through the position p, and a sum, so any reduction order
    gives the same bits). Equal sequences always get equal keys. Distinct sequences collide with
    probability about 2^-64 per pair if the mix behaves like a random function: for n distinct
    sequences the chance of any collision is about n^2 / 2^65 (3e-8 for a million sequences).

    Args:
        token_ids: int64 / int32 [T].
        offsets: int64 [N + 1].

    Returns:
        [N] int64.
    """
    return SEQUENCE_KEYS.run(backend, _device_of("token_ids", token_ids), token_ids, offsets)
