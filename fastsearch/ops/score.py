"""Verifier scoring: PRM step scores without vocabulary logits, step aggregation, embedding and ensemble scores.

A process reward model (PRM) in the Math-Shepherd style scores a reasoning step by the softmax over the
logits of a few tokens (e.g. "good" / "bad") at the step's tag position. Those logits need only a few rows
of the LM head, applied to the hidden states at the tag positions: ``[S, H] @ [H, C]`` instead of the
``[T, V]`` logit matrix that the usual code computes and then throws away but for two columns.

Ragged candidates: ``offsets`` [N + 1] (int64, CSR style, ``offsets[0] == 0``, ``offsets[-1] == S``)
says which steps belong to which candidate; dense [N, K] step scores need none, and 1-D step scores
without offsets are one candidate. Every op computes in fp32 and returns fp32; :func:`prm_scores` returns
the NamedTuple :class:`PRMScores` (candidate scores first, then the step scores they came from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastsearch.ops._common import FLOAT_DTYPES, Op, int_arg, lib, method_code, tensor_arg
from fastsearch.ops._select_checks import optional_tensor_arg
from fastsearch.ops.groups import check_groups, check_scores, pad_groups

AGGREGATIONS = {"last": 0, "min": 1, "prod": 2, "mean": 3, "max": 4, "logit_sum": 5}
ACTIVATIONS = {"softmax": 0, "sigmoid": 1}
ENSEMBLES = {"rank": 0, "zscore": 1}
MAX_HEAD_ROWS = 8
# logit_sum clips probabilities to [LOGIT_CLIP, 1 - LOGIT_CLIP] (fp32 values) before log(p / (1 - p)).
LOGIT_CLIP = 1e-7
# L2 normalisation divides by max(norm, NORM_EPS), as torch.nn.functional.normalize does.
NORM_EPS = 1e-12


class PRMScores(NamedTuple):
    """What :func:`prm_scores` returns: the candidate scores, then the step scores they aggregate.

    Attributes:
        scores: [N] float32, one aggregated score per candidate (0-d without offsets: one candidate).
        step_scores: [S] float32, the score of every step, candidate by candidate.
    """

    scores: torch.Tensor
    step_scores: torch.Tensor


lib.define("prm_step_scores(Tensor hidden_states, Tensor step_positions, Tensor head_weight, Tensor? head_bias, "
           "int positive_index, int activation) -> Tensor")
lib.define("aggregate_steps(Tensor step_scores, Tensor? offsets, int method, float? empty) -> Tensor")
lib.define("prm_scores(Tensor hidden_states, Tensor step_positions, Tensor offsets, Tensor head_weight, "
           "Tensor? head_bias, int positive_index, int activation, int method, float? empty) -> (Tensor, Tensor)")
lib.define("cosine_scores(Tensor embeddings, Tensor references, Tensor? offsets) -> Tensor")
lib.define("ensemble_scores(Tensor scores, Tensor? offsets, int method, Tensor? weights) -> Tensor")


# -- references ---------------------------------------------------------------------------------------


def _prm_step_scores_reference(hidden_states, step_positions, head_weight, head_bias, positive_index, activation):
    logits = hidden_states.index_select(0, step_positions).float() @ head_weight.float().T
    if head_bias is not None:
        logits = logits + head_bias.float()
    if activation == 0:
        return torch.softmax(logits, dim=-1)[:, positive_index].contiguous()
    return torch.sigmoid(logits[:, positive_index]).contiguous()


def _aggregate_steps_reference(step_scores, step_offsets, how, empty):
    padded, index = pad_groups(step_scores.float(), step_offsets, 0.0)
    valid = index >= 0
    sizes = valid.sum(-1)
    if how == 0:
        out = padded.gather(-1, (sizes - 1).clamp(min=0)[:, None]).squeeze(-1) if padded.shape[1] else sizes.float()
    elif how == 1:
        out = torch.where(valid, padded, torch.inf).amin(-1) if padded.shape[1] else sizes.float()
    elif how == 4:
        out = torch.where(valid, padded, -torch.inf).amax(-1) if padded.shape[1] else sizes.float()
    elif how == 2:
        out = torch.where(valid, padded, 1.0).prod(-1)
    elif how == 3:
        out = torch.where(valid, padded, 0.0).sum(-1) / sizes
    else:
        clipped = padded.clamp(LOGIT_CLIP, 1.0 - LOGIT_CLIP)
        out = torch.where(valid, torch.log(clipped) - torch.log1p(-clipped), 0.0).sum(-1)
    return torch.where(sizes > 0, out, float("nan") if empty is None else empty).contiguous()


def _prm_scores_reference(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                          activation, how, empty):
    steps = _prm_step_scores_reference(hidden_states, step_positions, head_weight, head_bias, positive_index,
                                       activation)
    return _aggregate_steps_reference(steps, step_offsets, how, empty), steps


def _cosine_scores_reference(embeddings, references, offsets):
    rows = embeddings.float()
    refs = references.float()
    if refs.dim() == 1:
        refs = refs.expand_as(rows)
    elif offsets is not None:
        owner = torch.repeat_interleave(torch.arange(refs.shape[0], device=rows.device), offsets[1:] - offsets[:-1])
        refs = refs.index_select(0, owner)
    dot = (rows * refs).sum(-1)
    # the contract's fp32 sums of squares (not torch's overflow-safe norm): a component past ~1.8e19 overflows
    # its sum to +inf on every backend alike
    norms = (rows * rows).sum(-1).sqrt().clamp(min=NORM_EPS) * (refs * refs).sum(-1).sqrt().clamp(min=NORM_EPS)
    return (dot / norms).contiguous()


def _ensemble_scores_reference(scores, offsets, how, weights):
    values = scores.float()
    num_verifiers, num = values.shape
    if offsets is None:
        offsets = torch.tensor([0, num], device=values.device)
    _, index = pad_groups(values[0], offsets, 0.0)
    valid = index >= 0
    padded = values[:, index.clamp(min=0)]  # [V, G, Cmax]
    nan = torch.isnan(padded)
    if how == 0:
        mine, other = padded[..., :, None], padded[..., None, :]
        mine_nan, other_nan = nan[..., :, None], nan[..., None, :]
        pair_valid = valid[:, :, None] & valid[:, None, :]
        below = ((other < mine) | (other_nan & ~mine_nan)) & pair_valid
        equal = ((other == mine) | (other_nan & mine_nan)) & pair_valid
        per_verifier = 1.0 + below.sum(-1) + (equal.sum(-1) - 1) / 2.0
    else:
        # fp64 sums: in fp32 the mean of many equal scores is not exactly that score, and z would not be 0
        wide = padded.double()
        finite = valid & torch.isfinite(wide)
        count = finite.sum(-1, keepdim=True)
        mean = torch.where(finite, wide, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
        var = torch.where(finite, (wide - mean) ** 2, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
        std = var.sqrt()
        z = torch.where(std > 0, (wide - mean) / std, 0.0).float()
        z = torch.where(padded == torch.inf, torch.inf, z)
        per_verifier = torch.where(nan | (padded == -torch.inf), -torch.inf, z)
    w = torch.ones(num_verifiers, device=values.device) if weights is None else weights.float()
    used = w != 0
    terms = torch.where(used[:, None, None], w[:, None, None] * per_verifier, 0.0)
    combined = terms.sum(0) / w[used].sum()
    out = torch.empty(num, dtype=torch.float32, device=values.device)
    out[index[valid]] = combined[valid]
    return out


# -- checks for the Python backends (the C++ kernels run the same checks) ------------------------------


def _check_int64_vector(name: str, tensor) -> None:
    tensor_arg(name, tensor)
    if tensor.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(tensor.shape)}")


def _check_float_data(name: str, tensor) -> None:
    tensor_arg(name, tensor)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def _check_same(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if tensor.dtype != other.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {other_name} has dtype {other.dtype}")
    if tensor.device != other.device:
        raise ValueError(f"{name} is on {tensor.device} but {other_name} is on {other.device}")


def _check_step_offsets(step_offsets: torch.Tensor, num_steps: int, empty) -> None:
    """int64 [N + 1] from 0 to S, non-decreasing; a candidate without steps needs ``empty``.

    On a GPU this costs a device sync, as the CUDA kernels' own check does: a bad offset would make the
    reference read out of bounds.
    """
    if step_offsets.numel() < 1 or step_offsets[0] != 0 or step_offsets[-1] != num_steps:
        first = step_offsets[0].item() if step_offsets.numel() else None
        last = step_offsets[-1].item() if step_offsets.numel() else None
        raise ValueError(f"offsets must start at 0 and end at S={num_steps}, got {first} ... {last}")
    sizes = step_offsets[1:] - step_offsets[:-1]
    if bool((sizes < 0).any()):
        raise ValueError("offsets must be non-decreasing")
    if empty is None and bool((sizes == 0).any()):
        candidate = int(torch.nonzero(sizes == 0)[0])
        raise ValueError(f"candidate {candidate} has no steps; pass empty= to give such candidates a score")


def _check_prm_step_scores(hidden_states, step_positions, head_weight, head_bias, positive_index, activation):
    _check_float_data("hidden_states", hidden_states)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {list(hidden_states.shape)}")
    _check_int64_vector("step_positions", step_positions)
    if step_positions.device != hidden_states.device:
        raise ValueError(f"step_positions is on {step_positions.device} but hidden_states is on "
                         f"{hidden_states.device}")
    _check_float_data("head_weight", head_weight)
    _check_same("head_weight", head_weight, "hidden_states", hidden_states)
    rows, hidden = hidden_states.shape
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden:
        raise ValueError(f"head_weight must be [C, H={hidden}], got shape {list(head_weight.shape)}")
    num_rows = head_weight.shape[0]
    if not 1 <= num_rows <= MAX_HEAD_ROWS:
        raise ValueError(f"head_weight must have 1 to {MAX_HEAD_ROWS} rows (C), got {num_rows}")
    if head_bias is not None:
        _check_float_data("head_bias", head_bias)
        _check_same("head_bias", head_bias, "hidden_states", hidden_states)
        if head_bias.shape != (num_rows,):
            raise ValueError(f"head_bias must be [C={num_rows}], got shape {list(head_bias.shape)}")
    if activation not in (0, 1):
        raise ValueError(f"activation must be 0 (softmax) or 1 (sigmoid), got {activation}")
    if activation == 0 and num_rows < 2:
        raise ValueError("activation='softmax' needs at least 2 head rows (a softmax over one logit is always 1); "
                         "use activation='sigmoid' for a single-logit head")
    if not 0 <= positive_index < num_rows:
        raise ValueError(f"positive_index must be in [0, C={num_rows}), got {positive_index}")
    if step_positions.numel():  # one device sync on a GPU (an out-of-range row would be a device-side assert)
        low, high = (int(value) for value in torch.aminmax(step_positions))
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise ValueError(f"step_positions must index hidden_states rows in [0, T={rows}), got {bad}")


def _check_aggregate_steps(step_scores, step_offsets, how, empty):
    check_scores("step_scores", step_scores)
    if how not in range(len(AGGREGATIONS)):
        raise ValueError(f"method must be 0..{len(AGGREGATIONS) - 1}, got {how}")
    if step_offsets is None:
        if step_scores.dim() != 2:
            raise ValueError(f"step_scores must be [N, K] (or flat [S] with offsets), got shape "
                             f"{list(step_scores.shape)}")
        if empty is None and step_scores.shape[1] == 0 and step_scores.shape[0] > 0:
            raise ValueError("candidate 0 has no steps; pass empty= to give such candidates a score")
        return
    _check_int64_vector("offsets", step_offsets)
    if step_scores.dim() != 1:
        raise ValueError(f"step_scores must be flat [S] when offsets are given, got shape "
                         f"{list(step_scores.shape)}")
    if step_offsets.device != step_scores.device:
        raise ValueError(f"offsets is on {step_offsets.device} but step_scores is on {step_scores.device}")
    _check_step_offsets(step_offsets, step_scores.numel(), empty)


def _check_prm_scores(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                      activation, how, empty):
    _check_prm_step_scores(hidden_states, step_positions, head_weight, head_bias, positive_index, activation)
    if how not in range(len(AGGREGATIONS)):
        raise ValueError(f"method must be 0..{len(AGGREGATIONS) - 1}, got {how}")
    _check_int64_vector("offsets", step_offsets)
    if step_offsets.device != hidden_states.device:
        raise ValueError(f"offsets is on {step_offsets.device} but hidden_states is on {hidden_states.device}")
    _check_step_offsets(step_offsets, step_positions.numel(), empty)


def _check_cosine_scores(embeddings, references, offsets):
    _check_float_data("embeddings", embeddings)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {list(embeddings.shape)}")
    _check_float_data("references", references)
    _check_same("references", references, "embeddings", embeddings)
    num, dim = embeddings.shape
    if references.dim() not in (1, 2) or references.shape[-1] != dim:
        raise ValueError(f"references must be [D={dim}], [N, D] or [G, D], got shape {list(references.shape)}")
    if offsets is None:
        if references.dim() == 2 and references.shape[0] != num:
            raise ValueError(f"references has {references.shape[0]} rows but embeddings has N={num}: pass offsets "
                             "[G + 1] to give one reference per group")
        return
    if references.dim() != 2:
        raise ValueError(f"references must be [G, D] when offsets are given, got shape {list(references.shape)}")
    check_groups("embeddings", embeddings[:, 0] if dim else embeddings.new_empty(num), offsets)
    if offsets.numel() - 1 != references.shape[0]:
        raise ValueError(f"offsets describe {offsets.numel() - 1} groups but references has {references.shape[0]} "
                         "rows")


def _check_ensemble_scores(scores, offsets, how, weights):
    check_scores("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [V, N] (one row per verifier), got shape {list(scores.shape)}")
    if scores.shape[0] < 1:
        raise ValueError("scores must hold at least one verifier (V >= 1)")
    if offsets is not None:
        check_groups("scores", scores[0], offsets)
    if how not in (0, 1):
        raise ValueError(f"method must be 0 (rank) or 1 (zscore), got {how}")
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32:
        raise TypeError(f"weights must be a float32 tensor, got {getattr(weights, 'dtype', type(weights).__name__)}")
    if weights.shape != (scores.shape[0],):
        raise ValueError(f"weights must be [V={scores.shape[0]}], got shape {list(weights.shape)}")
    if weights.device != scores.device:
        raise ValueError(f"weights is on {weights.device} but scores is on {scores.device}")
    if weights.device.type == "cpu":
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::prm_step_scores_triton", mutates_args=())
def _prm_step_scores_triton(hidden_states: torch.Tensor, step_positions: torch.Tensor, head_weight: torch.Tensor,
                            head_bias: torch.Tensor | None, positive_index: int, activation: int) -> torch.Tensor:
    from fastsearch.kernels import score as kernels

    return kernels.prm_step_scores(hidden_states, step_positions, head_weight, head_bias, positive_index, activation)


@torch.library.custom_op("fastsearch::aggregate_steps_triton", mutates_args=())
def _aggregate_steps_triton(step_scores: torch.Tensor, step_offsets: torch.Tensor | None, how: int,
                            empty: float | None) -> torch.Tensor:
    from fastsearch.kernels import score as kernels

    return kernels.aggregate_steps(step_scores, step_offsets, how, empty)


@torch.library.custom_op("fastsearch::prm_scores_triton", mutates_args=())
def _prm_scores_triton(hidden_states: torch.Tensor, step_positions: torch.Tensor, step_offsets: torch.Tensor,
                       head_weight: torch.Tensor, head_bias: torch.Tensor | None, positive_index: int, activation: int,
                       how: int, empty: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    from fastsearch.kernels import score as kernels

    return kernels.prm_scores(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                              activation, how, empty)


@torch.library.custom_op("fastsearch::cosine_scores_triton", mutates_args=())
def _cosine_scores_triton(embeddings: torch.Tensor, references: torch.Tensor,
                          offsets: torch.Tensor | None) -> torch.Tensor:
    from fastsearch.kernels import score as kernels

    return kernels.cosine_scores(embeddings, references, offsets)


@torch.library.custom_op("fastsearch::ensemble_scores_triton", mutates_args=())
def _ensemble_scores_triton(scores: torch.Tensor, offsets: torch.Tensor | None, how: int,
                            weights: torch.Tensor | None) -> torch.Tensor:
    from fastsearch.kernels import score as kernels

    return kernels.ensemble_scores(scores, offsets, how, weights)


def _step_scores_fake(hidden_states, step_positions, head_weight, head_bias, positive_index, activation):
    return hidden_states.new_empty(step_positions.shape, dtype=torch.float32)


def _aggregate_fake(step_scores, step_offsets, how, empty):
    num = step_scores.shape[0] if step_offsets is None else step_offsets.shape[0] - 1
    return step_scores.new_empty((num,), dtype=torch.float32)


def _prm_scores_fake(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index, activation,
                     how, empty):
    return (hidden_states.new_empty((step_offsets.shape[0] - 1,), dtype=torch.float32),
            hidden_states.new_empty(step_positions.shape, dtype=torch.float32))


def _cosine_fake(embeddings, references, offsets):
    return embeddings.new_empty((embeddings.shape[0],), dtype=torch.float32)


def _ensemble_fake(scores, offsets, how, weights):
    return scores.new_empty((scores.shape[1],), dtype=torch.float32)


PRM_STEP_SCORES = Op("prm_step_scores", _prm_step_scores_triton, _check_prm_step_scores, _prm_step_scores_reference,
                     _step_scores_fake)
AGGREGATE_STEPS = Op("aggregate_steps", _aggregate_steps_triton, _check_aggregate_steps, _aggregate_steps_reference,
                     _aggregate_fake)
PRM_SCORES = Op("prm_scores", _prm_scores_triton, _check_prm_scores, _prm_scores_reference, _prm_scores_fake)
COSINE_SCORES = Op("cosine_scores", _cosine_scores_triton, _check_cosine_scores, _cosine_scores_reference,
                   _cosine_fake)
ENSEMBLE_SCORES = Op("ensemble_scores", _ensemble_scores_triton, _check_ensemble_scores, _ensemble_scores_reference,
                     _ensemble_fake)


# -- public functions ----------------------------------------------------------------------------------


def _tokens(name: str, hidden_states) -> torch.Tensor:
    """[T, H] as given, or [..., H] flattened to [T, H] (a view when contiguous)."""
    if tensor_arg(name, hidden_states).dim() > 2:
        return hidden_states.reshape(-1, hidden_states.shape[-1])
    return hidden_states


def _head_args(step_positions, head_weight, head_bias) -> None:
    """Tensors where the ops take tensors: a None head would reach the compiled kernels as no dtype at all."""
    tensor_arg("step_positions", step_positions)
    tensor_arg("head_weight", head_weight)
    optional_tensor_arg("head_bias", head_bias)


def _positive_index(value, head_weight: torch.Tensor) -> int:
    """``positive_index`` as an int in [0, C) (C = head_weight's rows), checked before any backend: an int past
    int64 would otherwise reach the C++ schema as an unnamed conversion error."""
    value = int_arg("positive_index", value)
    rows = head_weight.shape[0] if head_weight.dim() >= 1 else 0
    if not 0 <= value < rows:
        raise ValueError(f"positive_index must be in [0, C={rows}), got {value}")
    return value


def _empty_arg(empty) -> float | None:
    if empty is None:
        return None
    if isinstance(empty, bool) or not isinstance(empty, int | float):
        raise TypeError(f"empty must be a float or None, got {type(empty).__name__}")
    return float(empty)


def prm_step_scores(hidden_states: torch.Tensor, step_positions: torch.Tensor, head_weight: torch.Tensor, *,
                    head_bias: torch.Tensor | None = None, positive_index: int = 0, activation: str = "softmax",
                    backend: str = "auto") -> torch.Tensor:
    """PRM step scores from hidden states at the step-tag positions, without any vocabulary logits.

    For step s with hidden row ``h = hidden_states[step_positions[s]]`` and logits ``l = head_weight @ h
    (+ head_bias)``: ``softmax(l)[positive_index]`` (a token-pair PRM: the rows of the LM head for the
    "good" and "bad" tokens, see :func:`fastsearch.integrations.transformers.lm_head_rows`) or
    ``sigmoid(l[positive_index])`` (a one-logit head).
    Equal to computing the full logits and taking the softmax of those columns, at a ``V / C`` fraction
    of the work and none of the ``[T, V]`` memory.

    Args:
        hidden_states: [T, H] float32 / float16 / bfloat16, packed tokens (e.g. the last entry of
            ``output_hidden_states``); [B, L, H] is flattened to T = B * L.
        step_positions: [S] int64 rows of ``hidden_states`` (the step-tag positions), each in [0, T).
        head_weight: [C, H], 1 <= C <= 8, the hidden states' dtype.
        head_bias: [C] or None.
        positive_index: which of the C logits is the "good" one.
        activation: ``"softmax"`` (C >= 2) or ``"sigmoid"``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [S] float32 step scores in [0, 1].

    Example:
        >>> from fastsearch.integrations.transformers import lm_head_rows
        >>> head = lm_head_rows(model, [good_id, bad_id])
        >>> hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        >>> fastsearch.prm_step_scores(hidden, tag_positions, head)
    """
    hidden_states = _tokens("hidden_states", hidden_states)
    _head_args(step_positions, head_weight, head_bias)
    return PRM_STEP_SCORES.run(backend, hidden_states.device, hidden_states, step_positions, head_weight, head_bias,
                               _positive_index(positive_index, head_weight),
                               method_code("activation", activation, ACTIVATIONS))


def aggregate_steps(step_scores: torch.Tensor, *, offsets: torch.Tensor | None = None, method: str = "last",
                    empty: float | None = None, backend: str = "auto") -> torch.Tensor:
    """One score per candidate from its ragged step scores, for all candidates in one launch.

    ``method``: ``last`` (the final step, the usual PRM choice), ``min``, ``max``, ``prod``, ``mean``, or
    ``logit_sum`` (``sum log(p / (1 - p))`` with p clipped to [1e-7, 1 - 1e-7]: the log-odds a
    particle filter accumulates). A NaN step score makes the candidate's score NaN (for ``last``, only
    a NaN final step does), which every selection op ranks last.

    Args:
        step_scores: flat [S] float with ``offsets``, dense [N, K] (candidate n owns row n), or [S]
            without ``offsets`` (one candidate).
        offsets: int64 [N + 1], candidate n owns steps ``offsets[n] : offsets[n + 1]``.
        method: the aggregation, see above.
        empty: the score of a candidate with no steps; None makes such a candidate an error.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [N] float32; a 0-d tensor for 1-D ``step_scores`` without offsets.

    Example:
        >>> steps = torch.tensor([0.9, 0.8, 0.3, 0.7])
        >>> fastsearch.aggregate_steps(steps, offsets=torch.tensor([0, 3, 4]), method="min")
        tensor([0.3000, 0.7000])
    """
    tensor_arg("step_scores", step_scores)
    optional_tensor_arg("offsets", offsets)
    code = method_code("method", method, AGGREGATIONS)
    if offsets is None and step_scores.dim() == 1:  # one candidate: the [1, S] row, candidate dimension dropped
        return AGGREGATE_STEPS.run(backend, step_scores.device, step_scores.unsqueeze(0), None, code,
                                   _empty_arg(empty)).squeeze(0)
    return AGGREGATE_STEPS.run(backend, step_scores.device, step_scores, offsets, code, _empty_arg(empty))


def prm_scores(hidden_states: torch.Tensor, step_positions: torch.Tensor, head_weight: torch.Tensor, *,
               offsets: torch.Tensor | None = None, head_bias: torch.Tensor | None = None, positive_index: int = 0,
               activation: str = "softmax", method: str = "last", empty: float | None = None,
               backend: str = "auto") -> PRMScores:
    """:func:`prm_step_scores` and :func:`aggregate_steps` fused into one launch.

    Args:
        hidden_states: [T, H] (or [B, L, H]) float32 / float16 / bfloat16.
        step_positions: [S] int64 step-tag rows of ``hidden_states``, candidate by candidate.
        head_weight: [C, H], as in :func:`prm_step_scores`.
        offsets: int64 [N + 1], candidate n owns steps ``offsets[n] : offsets[n + 1]``; None: all S steps
            are one candidate.
        head_bias, positive_index, activation: as in :func:`prm_step_scores`.
        method, empty: as in :func:`aggregate_steps`.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`PRMScores` ``(scores [N], step_scores [S])``, both float32; ``scores`` is 0-d without
        ``offsets``.

    Example:
        >>> scores, step_scores = fastsearch.prm_scores(hidden, tag_positions, head, offsets=step_offsets,
        ...                                             method="min")
    """
    hidden_states = _tokens("hidden_states", hidden_states)
    optional_tensor_arg("offsets", offsets)
    _head_args(step_positions, head_weight, head_bias)
    one_candidate = offsets is None
    if one_candidate:
        num_steps = tensor_arg("step_positions", step_positions).numel()
        offsets = torch.tensor([0, num_steps], device=hidden_states.device)
    scores, step_scores = PRM_SCORES.run(backend, hidden_states.device, hidden_states, step_positions, offsets,
                                         head_weight, head_bias, _positive_index(positive_index, head_weight),
                                         method_code("activation", activation, ACTIVATIONS),
                                         method_code("method", method, AGGREGATIONS), _empty_arg(empty))
    return tuple.__new__(PRMScores, (scores.squeeze(0) if one_candidate else scores, step_scores))


def cosine_scores(embeddings: torch.Tensor, references: torch.Tensor, *, offsets: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Cosine similarity of each embedding with its reference, normalising and dotting in one pass.

    ``score[n] = <e_n, r> / (max(|e_n|, 1e-12) * max(|r|, 1e-12))`` where r is the one reference
    (``references`` [D]), the n-th (``[N, D]``: pairwise, e.g. features of an early x0-prediction
    against the final sample), or that of n's group (``[G, D]`` with ``offsets``: e.g. one text
    embedding per prompt, as in CLIPScore).

    Args:
        embeddings: [N, D] float32 / float16 / bfloat16.
        references: [D], [N, D] or [G, D] (with ``offsets``), the embeddings' dtype.
        offsets: int64 [G + 1] over the N embeddings.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [N] float32 in [-1, 1].
    """
    optional_tensor_arg("offsets", offsets)
    return COSINE_SCORES.run(backend, tensor_arg("embeddings", embeddings).device, embeddings,
                             tensor_arg("references", references), offsets)


def ensemble_scores(scores: torch.Tensor, *, offsets: torch.Tensor | None = None, method: str = "rank",
                    weights: torch.Tensor | Sequence[float] | None = None, backend: str = "auto") -> torch.Tensor:
    """Combine V verifiers' scores into one score per candidate, group by group; higher is better.

    ``rank``: each verifier ranks the candidates of a group from 1 (worst) to the group's size (best),
    ties sharing their mean rank and NaN ranking below every number; the result is the weighted mean
    rank. ``zscore``: each verifier's scores are standardised per group, ``(s - mean) / std`` over its
    finite scores (population std; 0 when the std is 0), NaN and -inf scoring -inf and +inf +inf; the
    result is the weighted mean z-score. Verifiers with weight 0 are left out.

    Args:
        scores: [V, N] (or [N] for one verifier) float, one row per verifier.
        offsets: int64 [G + 1] groups over N (e.g. one group per prompt); None: one group of all N.
        method: ``"rank"`` or ``"zscore"``.
        weights: [V] non-negative, not all zero (a tensor or a sequence); None weights all equally.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [N] float32.

    Example:
        >>> fastsearch.ensemble_scores(torch.stack([clip, aesthetic]), offsets=prompt_offsets, method="rank")
    """
    optional_tensor_arg("offsets", offsets)
    if tensor_arg("scores", scores).dim() == 1:
        scores = scores[None]
    if weights is not None and not (isinstance(weights, torch.Tensor) and weights.dtype == torch.float32
                                    and weights.device == scores.device):
        try:
            weights = torch.as_tensor(weights, dtype=torch.float32, device=scores.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"weights must be a float tensor or a sequence of numbers, got {weights!r}") from error
    return ENSEMBLE_SCORES.run(backend, scores.device, scores, offsets, method_code("method", method, ENSEMBLES),
                               weights)
