"""Answer voting over groups of candidates, and the 64-bit sequence keys that say which answers are equal.

Groups of answer keys are dense, ragged or one 1-D group, as :mod:`fastsearch.ops.groups` lays them out.
``vote`` returns row-local indices for dense input (like ``torch.topk(dim=-1)``) and indices into the flat
tensor for ragged input.
"""

from __future__ import annotations

import torch

from fastsearch.ops._common import Op, lib, method_code, tensor_arg
from fastsearch.ops._select_checks import optional_tensor_arg
from fastsearch.ops.groups import check_groups, check_like_groups, check_scores, num_groups, pad_groups, row

VOTE_MODES = {"majority": 0, "weighted": 1, "max": 2}

lib.define("vote(Tensor answer_keys, Tensor? scores, Tensor? offsets, Tensor? mask, int method) -> Tensor")
lib.define("sequence_keys(Tensor token_ids, Tensor offsets) -> Tensor")


# -- references ---------------------------------------------------------------------------------------


def _vote_reference(answer_keys, scores, offsets, mask, mode):
    keys, index = pad_groups(answer_keys, offsets, 0)
    valid = index >= 0
    if mask is not None:
        valid &= pad_groups(mask, offsets, False)[0]
    if scores is not None:
        padded_scores = pad_groups(scores.float(), offsets, 0.0)[0]
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
        # A NaN sum (+inf and -inf in one answer) loses to every number; with only NaN sums the first wins.
        numeric = valid & ~torch.isnan(total)
        best = torch.where(numeric, total, torch.full_like(total, -torch.inf)).max(-1, keepdim=True).values
        top = torch.where(numeric.any(-1, keepdim=True), numeric & (total == best), valid)
        winner = torch.where(top, first, torch.full_like(first, width)).min(-1).values
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


# A and B of the sequence-key hash (csrc/README.md, sequence_keys), the same bits on every backend; held
# as int64 because torch multiplies int64 with wrap-around but has no uint64 arithmetic.
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


def _check_vote(answer_keys, scores, offsets, mask, mode):
    if not isinstance(answer_keys, torch.Tensor) or answer_keys.dtype != torch.int64:
        raise TypeError(f"answer_keys must be an int64 tensor, got {getattr(answer_keys, 'dtype', answer_keys)}")
    check_groups("answer_keys", answer_keys, offsets)
    if mode not in (0, 1, 2):
        raise ValueError(f"method must be 0 (majority), 1 (weighted) or 2 (max), got {mode}")
    if mode != 0 and scores is None:
        raise ValueError("weighted and max voting need scores")
    if scores is not None:
        check_scores("scores", scores)
        check_like_groups("scores", scores, answer_keys, (scores.dtype,), "floating-point")
    check_like_groups("mask", mask, answer_keys, (torch.bool,), "bool")


def _check_sequence_keys(token_ids, offsets):
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_ids must be an int64 or int32 tensor, got {getattr(token_ids, 'dtype', token_ids)}")
    if offsets is None:
        raise ValueError("sequence_keys needs offsets")
    check_groups("token_ids", token_ids, offsets)


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::vote_triton", mutates_args=())
def _vote_triton(answer_keys: torch.Tensor, scores: torch.Tensor | None, offsets: torch.Tensor | None,
                 mask: torch.Tensor | None, mode: int) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.vote(answer_keys, scores, offsets, mask, mode)


@torch.library.custom_op("fastsearch::sequence_keys_triton", mutates_args=())
def _sequence_keys_triton(token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.sequence_keys(token_ids, offsets)


def _vote_fake(answer_keys, scores, offsets, mask, mode):
    return answer_keys.new_empty((num_groups(answer_keys, offsets),))


def _sequence_keys_fake(token_ids, offsets):
    return token_ids.new_empty((offsets.shape[0] - 1,), dtype=torch.int64)


VOTE = Op("vote", _vote_triton, _check_vote, _vote_reference, _vote_fake)
SEQUENCE_KEYS = Op("sequence_keys", _sequence_keys_triton, _check_sequence_keys, _sequence_keys_reference,
                   _sequence_keys_fake)


# -- public functions ----------------------------------------------------------------------------------


def vote(answer_keys: torch.Tensor, scores: torch.Tensor | None = None, *, offsets: torch.Tensor | None = None,
         method: str = "majority", mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Pick one answer per group: majority, weighted (sum of scores) or max (best single score).

    ``majority``: the answer with most members wins; on a tie, the answer that reaches the top count
    first in candidate order. ``weighted``: the largest sum of scores wins (ties: the answer seen
    first). ``max``: the answer holding the best single score (ties: lower index). The winner is
    reported as the index of the first candidate of the winning answer. Masked-out candidates (and
    NaN scores, for weighted and max) do not vote; a group with no voter gives -1.

    Scores are read as fp32 on every backend: a float64 score is rounded to fp32 once, and compared and
    summed in fp32 (csrc/README.md, vote), so float64 scores that differ only beyond fp32 precision tie.

    Args:
        answer_keys: int64 [G, C], flat [T] with ``offsets``, or [C] (one group) (e.g. :func:`sequence_keys`
            of answers).
        scores: float like ``answer_keys``; needed for ``weighted`` and ``max``.
        offsets: int64 [G + 1] for ragged groups.
        method: ``"majority"``, ``"weighted"`` or ``"max"``.
        mask: bool like ``answer_keys``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        winners [G] int64: row-local for dense input, flat for ragged input; a 0-d index into
        ``answer_keys`` for 1-D input without offsets.
    """
    code = method_code("method", method, VOTE_MODES)
    device = tensor_arg("answer_keys", answer_keys).device
    for name, value in (("scores", scores), ("offsets", offsets), ("mask", mask)):
        optional_tensor_arg(name, value)
    if offsets is None and answer_keys.dim() == 1:
        return VOTE.run(backend, device, answer_keys.unsqueeze(0), row("scores", scores, answer_keys, "answer_keys"),
                        None, row("mask", mask, answer_keys, "answer_keys"), code).squeeze(0)
    return VOTE.run(backend, device, answer_keys, scores, offsets, mask, code)


def sequence_keys(token_ids: torch.Tensor, *, offsets: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """A 64-bit key per token sequence, for exact-duplicate detection and answer grouping.

    ``key = mix(len ^ sum_p mix(token_p * A + p * B + 1))`` with the splitmix64 finaliser ``mix`` and
    wrapping 64-bit arithmetic (order-aware through the position p, and a sum, so any reduction order
    gives the same bits). Equal sequences always get equal keys. Distinct sequences collide with
    probability about 2^-64 per pair if the mix behaves like a random function: for n distinct
    sequences the chance of any collision is about n^2 / 2^65 (3e-8 for a million sequences).

    Args:
        token_ids: int64 / int32: flat [T] with ``offsets`` (ragged sequences), [N, L] without (N
            sequences of L tokens), or [L] without (one sequence).
        offsets: int64 [N + 1]; sequence n is ``token_ids[offsets[n]:offsets[n + 1]]``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [N] int64; a 0-d key for 1-D ``token_ids`` without offsets.

    Example:
        >>> tokens = torch.tensor([5, 6, 7, 5, 6, 7, 5])
        >>> keys = fastsearch.sequence_keys(tokens, offsets=torch.tensor([0, 3, 6, 7]))
        >>> bool(keys[0] == keys[1]), bool(keys[1] == keys[2])
        (True, False)
    """
    device = tensor_arg("token_ids", token_ids).device
    optional_tensor_arg("offsets", offsets)
    if offsets is not None:
        return SEQUENCE_KEYS.run(backend, device, token_ids, offsets)
    if token_ids.dim() == 1:  # one sequence
        bounds = torch.tensor([0, token_ids.shape[0]], device=device)
        return SEQUENCE_KEYS.run(backend, device, token_ids, bounds).squeeze(0)
    if token_ids.dim() == 2:  # N sequences of L tokens: the CSR offsets of equal-size groups
        count, length = token_ids.shape
        bounds = torch.arange(count + 1, device=device) * length
        return SEQUENCE_KEYS.run(backend, device, token_ids.reshape(-1), bounds)
    raise ValueError(f"token_ids must be [N, L], [L] (one sequence) or flat [T] with offsets, got shape "
                     f"{list(token_ids.shape)}")
