"""Particle weights: resampling ancestors and the effective sample size, every group in one launch.

Groups of log-weights are dense, ragged or one 1-D group, as :mod:`fastsearch.ops.groups` lays them out.
``resample`` always returns flat indices (``g * C + j`` for dense input), ready to gather particles.
"""

from __future__ import annotations

import torch

from fastsearch.ops._common import Op, int_arg, lib, method_code, tensor_arg
from fastsearch.ops._select_checks import check_output_width, optional_tensor_arg
from fastsearch.ops.groups import check_at_least_one, check_groups, check_scores, num_groups, pad_groups
from fastsearch.ops.noise import philox_uniforms
from fastsearch.seeding import check_seed

RESAMPLE_METHODS = {"multinomial": 0, "systematic": 1, "stratified": 2, "residual": 3}

lib.define("resample(Tensor log_weights, Tensor? offsets, int num_samples, int method, int seed) -> Tensor")
lib.define("effective_sample_size(Tensor log_weights, Tensor? offsets) -> Tensor")


# -- references ---------------------------------------------------------------------------------------


def _normalised_weights(log_weights, offsets):
    """Per-group normalised weights [G, Cmax] (0 in padding) and the flat index, in fp32."""
    padded, index = pad_groups(log_weights.float(), offsets, -torch.inf)
    padded = torch.where(index >= 0, padded, torch.full_like(padded, -torch.inf))
    top = padded.max(dim=-1, keepdim=True).values if padded.shape[1] else padded.new_full((padded.shape[0], 1),
                                                                                          -torch.inf)
    weights = torch.exp(padded - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    return weights, index, top.squeeze(-1)


def _resample_reference(log_weights, offsets, num_samples, method, seed):
    if offsets is None:  # resample reports flat indices for dense input too
        groups, size = log_weights.shape
        offsets = torch.arange(groups + 1, device=log_weights.device) * size
        log_weights = log_weights.reshape(-1)
    weights, index, _ = _normalised_weights(log_weights, offsets)
    groups = weights.shape[0]
    if groups == 0:  # no group: no draw (a group without candidates is refused by the check)
        return torch.empty((0, num_samples), dtype=torch.int64, device=log_weights.device)
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
    ess = torch.where(torch.isfinite(top), ess, torch.zeros_like(ess))
    # A NaN or +inf log-weight is not a weight: that group's ESS is NaN (empty and all -inf groups give 0).
    padded, index = pad_groups(log_weights.float(), offsets, 0.0)  # read as fp32: 1e300 in float64 is +inf
    not_weight = ((torch.isnan(padded) | (padded == torch.inf)) & (index >= 0)).any(-1)
    return torch.where(not_weight, torch.full_like(ess, torch.nan), ess)


# -- checks for the Python backends (the C++ kernels run the same checks) ------------------------------


def _check_log_weights(log_weights, offsets):
    check_scores("log_weights", log_weights)
    check_groups("log_weights", log_weights, offsets)


def _check_resample(log_weights, offsets, num_samples, method, seed):
    _check_log_weights(log_weights, offsets)
    check_at_least_one("num_samples", num_samples)
    if method not in (0, 1, 2, 3):
        raise ValueError(f"method must be 0..3, got {method}")
    # Log-weights are read as fp32, as every kernel reads them: a float64 1e300 is +inf there.
    groups, index = pad_groups(log_weights.float(), offsets, -torch.inf)
    inside = index >= 0
    not_weight = ((torch.isnan(groups) | (groups == torch.inf)) & inside).any(-1)
    if bool(not_weight.any()):
        raise ValueError(f"log_weights contain NaN or +inf (group {int(torch.nonzero(not_weight)[0])}): a "
                         "log-weight must be a number below +inf")
    alive = ((groups > -torch.inf) & inside).any(-1)
    if not bool(alive.all()):
        dead = int(torch.nonzero(~alive)[0])
        raise ValueError(f"log_weights: group {dead} has no candidate with finite log-weight (all -inf or empty): "
                         "nothing to resample from")


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::resample_triton", mutates_args=())
def _resample_triton(log_weights: torch.Tensor, offsets: torch.Tensor | None, num_samples: int, method: int,
                     seed: int) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.resample(log_weights, offsets, num_samples, method, seed)


@torch.library.custom_op("fastsearch::effective_sample_size_triton", mutates_args=())
def _effective_sample_size_triton(log_weights: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    from fastsearch.kernels import select as kernels

    return kernels.effective_sample_size(log_weights, offsets)


def _resample_fake(log_weights, offsets, num_samples, method, seed):
    return log_weights.new_empty((num_groups(log_weights, offsets), num_samples), dtype=torch.int64)


def _ess_fake(log_weights, offsets):
    return log_weights.new_empty((num_groups(log_weights, offsets),), dtype=torch.float32)


RESAMPLE = Op("resample", _resample_triton, _check_resample, _resample_reference, _resample_fake)
EFFECTIVE_SAMPLE_SIZE = Op("effective_sample_size", _effective_sample_size_triton, _check_log_weights,
                           _effective_sample_size_reference, _ess_fake)


# -- public functions ----------------------------------------------------------------------------------


def resample(log_weights: torch.Tensor, num_samples: int, *, offsets: torch.Tensor | None = None,
             method: str = "systematic", seed: int, backend: str = "auto") -> torch.Tensor:
    """Draw ``num_samples`` ancestors per group from normalised weights ``softmax(log_weights)``.

    Methods: ``multinomial`` (iid draws, in draw order), ``systematic`` (one uniform per group, sorted),
    ``stratified`` (one uniform per stratum, sorted), ``residual`` (``floor(N w)`` copies of each
    candidate in index order, then the remainder drawn multinomially from the residual weights).
    Uniforms come from the Philox stream of ``seed`` (position ``g * num_samples + i``), so a seed gives
    the same ancestors on every backend (up to rounding at CDF boundaries).

    Args:
        log_weights: [G, C], flat [T] with ``offsets`` [G + 1], or [C] (one group); float. A group whose
            weights are all -inf (or that is empty) is an error; NaN and +inf are errors. No group
            (G = 0) gives an empty [0, N] result.
        num_samples: ancestors per group (N).
        offsets: int64 [G + 1] for ragged groups.
        method: see above.
        seed: int.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ancestors [G, N] int64, indices into the flat tensor (``g * C + j`` for dense input); for 1-D
        ``log_weights`` [C] without offsets, [N] indices into it (as ``torch.multinomial`` shapes 1-D draws).
    """
    code = method_code("method", method, RESAMPLE_METHODS)
    num_samples = int_arg("num_samples", num_samples)
    device = tensor_arg("log_weights", log_weights).device
    optional_tensor_arg("offsets", offsets)
    check_output_width("num_samples", num_samples, log_weights, offsets)
    if offsets is None and log_weights.dim() == 1:  # one group: its flat indices g * C + j are just j
        return RESAMPLE.run(backend, device, log_weights.unsqueeze(0), None, num_samples, code,
                            check_seed(seed)).squeeze(0)
    return RESAMPLE.run(backend, device, log_weights, offsets, num_samples, code, check_seed(seed))


def effective_sample_size(log_weights: torch.Tensor, *, offsets: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` per group, with ``w = exp(log_weights)``.

    Args:
        log_weights: [G, C], flat [T] with ``offsets`` [G + 1], or [C] (one group); float.
        offsets: int64 [G + 1] for ragged groups.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [G] float32; 0 for a group with no candidate or only -inf log-weights, NaN for a group holding a
        NaN or +inf log-weight (not a weight). A 0-d tensor for 1-D
        ``log_weights`` without offsets.
    """
    device = tensor_arg("log_weights", log_weights).device
    optional_tensor_arg("offsets", offsets)
    if offsets is None and log_weights.dim() == 1:
        return EFFECTIVE_SAMPLE_SIZE.run(backend, device, log_weights.unsqueeze(0), None).squeeze(0)
    return EFFECTIVE_SAMPLE_SIZE.run(backend, device, log_weights, offsets)
