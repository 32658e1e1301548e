"""Property-based differential tests of the scoring ops and zo_neighbors, and of mixed-dtype arguments
(see tests/test_properties.py for the scheme).

Hidden states, heads and embeddings come in every float dtype, contiguous, transposed or strided, with
ragged candidates (empty ones included), tied and special values; each kernel backend must give the
reference's result (to the rounding of the input dtype) or raise the same kind of error. Arguments of
mismatched dtypes must be refused alike by every backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from test_properties import agree, groups  # also loads the hypothesis profile

import fastsearch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close_for(dtype):
    """A comparison for ``agree`` with the rounding of ``dtype`` (sums of H products differ in order)."""
    tol = TOLERANCE.get(dtype, 1e-5)

    def same(got, want, what):
        if got is None or want is None:  # an output a call leaves out (e.g. beam_prune's without refill)
            assert got is None and want is None, what
            return
        got, want = got.cpu(), want.cpu()
        assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
        if got.dtype.is_floating_point:
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True, msg=what)
        else:
            assert torch.equal(got, want), what

    return same


@st.composite
def matrix(draw, rows, cols, dtype, *, specials=False, scale=1.0):
    """[rows, cols] of ``dtype``: small multiples of ``scale / 4`` (ties), maybe NaN / inf; contiguous,
    transposed-layout or strided."""
    pool = [scale * v / 4 for v in draw(st.lists(st.integers(-6, 6), min_size=1, max_size=6))]
    if specials:
        pool += draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=1))
    flat = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=rows * cols, max_size=rows * cols)),
                        dtype=torch.float32).reshape(rows, cols).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        return flat.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(rows, 2 * cols, dtype=dtype)
        wide[:, ::2] = flat
        return wide[:, ::2]
    return flat


@st.composite
def prm_case(draw):
    """hidden [T, H], positions [S], head [C, H], bias [C] or None, activation, positive index, candidate sizes."""
    dtype = draw(st.sampled_from(DTYPES))
    tokens, width = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    activation = draw(st.sampled_from(["softmax", "sigmoid"]))
    classes = draw(st.integers(2 if activation == "softmax" else 1, 4))
    hidden = draw(matrix(tokens, width, dtype, specials=draw(st.booleans()), scale=0.5))
    head = draw(matrix(classes, width, dtype, scale=0.5))
    bias = draw(matrix(1, classes, dtype))[0] if draw(st.booleans()) else None
    sizes, offsets = draw(groups(max_groups=5, max_size=6))
    positions = torch.tensor(draw(st.lists(st.integers(0, tokens - 1), min_size=sum(sizes), max_size=sum(sizes))),
                             dtype=torch.int64)
    return dtype, hidden, positions, head, bias, activation, draw(st.integers(0, classes - 1)), offsets


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(case=prm_case())
def test_prm_step_scores(device, backend, case):
    dtype, hidden, positions, head, bias, activation, positive, _ = case
    agree(lambda b: fastsearch.prm_step_scores(hidden.to(device), positions.to(device), head.to(device),
                                                head_bias=None if bias is None else bias.to(device),
                                                positive_index=positive, activation=activation, backend=b),
          backend, same=close_for(dtype))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(case=prm_case(), method=st.sampled_from(["last", "min", "prod", "mean", "max", "logit_sum"]),
       empty=st.sampled_from([None, 0.0, float("nan")]))
def test_prm_scores(device, backend, case, method, empty):
    dtype, hidden, positions, head, bias, activation, positive, offsets = case
    agree(lambda b: fastsearch.prm_scores(hidden.to(device), positions.to(device), head.to(device),
                                           offsets=offsets.to(device),
                                           head_bias=None if bias is None else bias.to(device),
                                           positive_index=positive, activation=activation, method=method,
                                           empty=empty, backend=b),
          backend, same=close_for(dtype))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), reference=st.sampled_from(["one", "pairwise", "grouped"]))
def test_cosine_scores(device, backend, data, dtype, reference):
    sizes, offsets = data.draw(groups(max_groups=5, max_size=6))
    total, width = sum(sizes), data.draw(st.integers(1, 33))
    embeddings = data.draw(matrix(total, width, dtype, specials=data.draw(st.booleans())))
    if reference == "one":
        refs, offsets = data.draw(matrix(1, width, dtype))[0], None
    elif reference == "pairwise":
        refs, offsets = data.draw(matrix(total, width, dtype)), None
    else:
        refs = data.draw(matrix(len(sizes), width, dtype))
    agree(lambda b: fastsearch.cosine_scores(embeddings.to(device), refs.to(device),
                                              offsets=None if offsets is None else offsets.to(device), backend=b),
          backend, same=close_for(dtype))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), neighbors=st.integers(1, 4),
       cos_sim=st.sampled_from([-1.0, -0.3, 0.0, 0.5, 0.95, 1.0]), seed=st.integers(0, 2**63 - 1))
def test_zo_neighbors(device, backend, data, dtype, neighbors, cos_sim, seed):
    batch, width = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 17))
    pivot = data.draw(matrix(batch, width, dtype, specials=data.draw(st.booleans())))
    # neighbours are |x| (c u + s w): rounding of the norm and of the projection carry the input dtype's error
    agree(lambda b: fastsearch.zo_neighbors(pivot.to(device), neighbors, cos_sim=cos_sim, seed=seed, backend=b),
          backend, same=close_for(dtype if dtype != torch.float32 else torch.float16))


# -- mixed dtypes: refused alike -------------------------------------------------------------------------


MIXED_CALLS = {
    "ddim_step": lambda a, b, bk: fastsearch.ddim_step(a, b, 0.5, 0.6, backend=bk),
    "flow_euler_step": lambda a, b, bk: fastsearch.flow_euler_step(a, b, 0.5, 0.3, backend=bk),
    "flow_heun_step": lambda a, b, bk: fastsearch.flow_heun_step(a, b, b, 0.5, 0.3, backend=bk),
    "renoise": lambda a, b, bk: fastsearch.renoise(a, 0.3, 0.5, schedule="flow", noise=b, backend=bk),
    "cosine_scores": lambda a, b, bk: fastsearch.cosine_scores(a, b[0], backend=bk),
    "prm_step_scores": lambda a, b, bk: fastsearch.prm_step_scores(a, torch.tensor([0, 1], device=a.device), b[:2],
                                                                    backend=bk),
}


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", list(MIXED_CALLS))
@given(first=st.sampled_from(DTYPES + [torch.float64]), second=st.sampled_from(DTYPES + [torch.float64]))
def test_mixed_float_dtypes(device, backend, op, first, second):
    """Two float arguments of different dtypes: the same error on every backend (or the same result)."""
    a = torch.linspace(-1, 1, 12, device=device).reshape(3, 4).to(first)
    b = torch.linspace(1, -0.5, 12, device=device).reshape(3, 4).to(second)
    agree(lambda bk: MIXED_CALLS[op](a, b, bk), backend, same=close_for(first))
    if first != second:
        with pytest.raises((TypeError, ValueError), match=r"dtype|must be float"):
            MIXED_CALLS[op](a, b, backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(scores_dtype=st.sampled_from(DTYPES + [torch.float64, torch.int64]),
       offsets_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]),
       mask_dtype=st.sampled_from([None, torch.bool, torch.uint8, torch.int64]))
def test_mixed_selection_argument_dtypes(device, backend, scores_dtype, offsets_dtype, mask_dtype):
    """Selection ops with offsets / masks of other dtypes: refused alike, naming the argument."""
    scores = torch.tensor([0.5, 2.0, -1.0, 3.0, 0.0], device=device).to(scores_dtype)
    offsets = torch.tensor([0, 2, 5], device=device).to(offsets_dtype)
    mask = None if mask_dtype is None else torch.tensor([1, 0, 1, 1, 0], device=device).to(mask_dtype)
    same = close_for(torch.float32)
    agree(lambda b: fastsearch.segmented_topk(scores, 2, offsets=offsets, mask=mask, backend=b), backend, same)
    agree(lambda b: fastsearch.beam_prune(scores, 1, offsets=offsets, finished=mask, backend=b), backend, same)
    if offsets_dtype != torch.int64 and scores_dtype.is_floating_point:
        with pytest.raises((TypeError, ValueError), match="offsets"):
            fastsearch.segmented_topk(scores, 2, offsets=offsets, backend=backend)
