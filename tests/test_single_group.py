"""A 1-D tensor without offsets is one group (as torch.topk treats it), for every selection op.

On every backend the 1-D result must equal the result for the same data as one [1, C] row, with the
group dimension dropped, and be shaped as torch.topk / torch.multinomial shape their 1-D results.
"""

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS

import fastsearch

NAN, INF = float("nan"), float("inf")
SIZES = [1, 7, 130]
METHODS = ["multinomial", "systematic", "stratified", "residual"]


def _tied_scores(size, seed, dtype=torch.float32, specials=True):
    """Few distinct values (many exact ties in every dtype), with NaN and -inf sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (size,), generator=g).float() / 2
    if specials and size > 2:
        special = torch.rand(size, generator=g)
        scores[special < 0.1] = NAN
        scores[(special >= 0.1) & (special < 0.15)] = -INF
    return scores.to(dtype)


def _assert_same(got, expected):
    """Bit-equal tensors of the same shape and dtype (NaN nowhere: the selections never return NaN)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected), (got, expected)


# -- segmented_topk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("k", [1, 5, 140])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segmented_topk_one_group(device, backend, size, k, largest, dtype):
    scores = _tied_scores(size, seed=size + k, dtype=dtype).to(device)
    mask = (torch.arange(size, device=device) % 5) != 2
    values, indices = fastsearch.segmented_topk(scores, k, mask=mask, largest=largest, backend=backend)
    row = fastsearch.segmented_topk(scores[None], k, mask=mask[None], largest=largest, backend=backend)
    assert values.shape == (k,) and indices.shape == (k,)
    _assert_same(values, row[0][0])
    _assert_same(indices, row[1][0])
    # Indices point into the 1-D input, and the reference gives the same selection.
    chosen = indices >= 0
    assert torch.equal(scores[indices[chosen]], values[chosen])
    ref = fastsearch.segmented_topk(scores, k, mask=mask, largest=largest, backend="torch")
    _assert_same(indices, ref[1])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segmented_topk_one_group_like_torch_topk(device, backend, size, dtype):
    """Without NaN, mask or padding the values and shapes are torch.topk's; ties go to the lower index."""
    scores = _tied_scores(size, seed=3, dtype=dtype, specials=False).to(device)
    k = min(size, 4)
    values, indices = fastsearch.segmented_topk(scores, k, backend=backend)
    expected = torch.topk(scores, k)
    assert values.shape == expected.values.shape and indices.shape == expected.indices.shape
    _assert_same(values, expected.values)
    # torch.topk does not promise an order among ties; the lower index first is this library's rule.
    stable = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    _assert_same(indices, stable)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_segmented_topk_one_group_strided(device, backend):
    base = torch.arange(40.0, device=device).remainder(7)
    scores = base[::3]  # a non-contiguous 1-D view: the indices are into the view
    values, indices = fastsearch.segmented_topk(scores, 3, backend=backend)
    expected = torch.sort(scores, descending=True, stable=True)
    _assert_same(values, expected.values[:3])
    _assert_same(indices, expected.indices[:3])


# -- beam_prune -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_beam_prune_one_group(device, backend, size, options, dtype):
    g = torch.Generator().manual_seed(size)
    scores = _tied_scores(size, seed=size, dtype=dtype).to(device)
    companions = {}
    if options == "all":
        companions = {
            "finished": (torch.rand(size, generator=g) < 0.2).to(device),
            "lengths": torch.randint(1, 9, (size,), generator=g).to(device),
            "dedup_keys": torch.randint(0, 6, (size,), generator=g).to(device),
        }
    k = 4
    out = fastsearch.beam_prune(scores, k, length_penalty=0.5, refill_to=9, backend=backend, **companions)
    row = fastsearch.beam_prune(scores[None], k, length_penalty=0.5, refill_to=9, backend=backend,
                                **{name: t[None] for name, t in companions.items()})
    assert isinstance(out, fastsearch.BeamSelection)
    assert out.indices.shape == (k,) and out.values.shape == (k,)
    assert out.counts.shape == () and out.parents.shape == (9,)
    for got, expected in zip(out, row, strict=True):
        _assert_same(got, expected[0])
    assert 0 <= int(out.counts) <= min(k, size)
    live = out.indices[: int(out.counts)]
    assert torch.all((live >= 0) & (live < size)) and torch.all(out.indices[int(out.counts):] == -1)
    ref = fastsearch.beam_prune(scores, k, length_penalty=0.5, refill_to=9, backend="torch", **companions)
    _assert_same(out.indices, ref.indices)
    _assert_same(out.parents, ref.parents)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_beam_prune_one_group_without_refill(device, backend):
    scores = torch.tensor([0.5, 2.0, 2.0, -1.0, 3.0], device=device)
    out = fastsearch.beam_prune(scores, 3, backend=backend)
    assert out.parents is None
    _assert_same(out.indices, torch.tensor([4, 1, 2], device=device))
    _assert_same(out.values, torch.tensor([3.0, 2.0, 2.0], device=device))
    _assert_same(out.counts, torch.tensor(3, device=device))


# -- resample ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resample_one_group(device, backend, size, method, dtype):
    g = torch.Generator().manual_seed(size)
    log_weights = torch.randn(size, generator=g) * 2
    log_weights[torch.rand(size, generator=g) < 0.3] = -INF
    log_weights[0] = 0.0  # one live candidate at least
    log_weights = log_weights.to(dtype).to(device)
    ancestors = fastsearch.resample(log_weights, 16, method=method, seed=11, backend=backend)
    row = fastsearch.resample(log_weights[None], 16, method=method, seed=11, backend=backend)
    shape = torch.multinomial(torch.ones(size), 16, replacement=True).shape
    assert ancestors.shape == shape == (16,)
    _assert_same(ancestors, row[0])
    assert torch.all((ancestors >= 0) & (ancestors < size))
    assert torch.all(log_weights[ancestors] > -INF)  # never an ancestor without weight


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_resample_log_w_1d_16(device, backend):
    """The case of the report: resample(log_w_1d, 16) is a [16] tensor of indices into log_w_1d."""
    log_w = torch.log(torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0], device=device))
    ancestors = fastsearch.resample(log_w, 16, seed=0, backend=backend)
    assert ancestors.shape == (16,) and ancestors.dtype == torch.int64
    # systematic: 4 copies of candidate 1, 12 of candidate 3, in index order
    _assert_same(ancestors, torch.tensor([1] * 4 + [3] * 12, device=device))


# -- effective_sample_size -----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_effective_sample_size_one_group(device, backend, size, dtype):
    g = torch.Generator().manual_seed(size)
    log_weights = (torch.randn(size, generator=g) * 1.5).to(dtype)
    log_weights[-1] = -INF
    log_weights = log_weights.to(device)
    ess = fastsearch.effective_sample_size(log_weights, backend=backend)
    row = fastsearch.effective_sample_size(log_weights[None], backend=backend)
    assert ess.shape == () and ess.dtype == torch.float32
    _assert_same(ess, row[0])
    w = torch.exp(log_weights.double().cpu())
    expected = (w.sum() ** 2 / (w * w).sum()).float() if size > 1 else torch.tensor(0.0)
    torch.testing.assert_close(ess.cpu(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_effective_sample_size_one_group_equal_weights(device, backend):
    ess = fastsearch.effective_sample_size(torch.zeros(7, device=device), backend=backend)
    torch.testing.assert_close(ess.cpu(), torch.tensor(7.0))


# -- vote -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["majority", "weighted", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vote_one_group(device, backend, size, method, dtype):
    g = torch.Generator().manual_seed(size)
    keys = torch.randint(0, 4, (size,), generator=g).to(device)
    scores = _tied_scores(size, seed=size + 1, dtype=dtype).to(device)
    mask = (torch.rand(size, generator=g) > 0.1).to(device)
    winner = fastsearch.vote(keys, scores, method=method, mask=mask, backend=backend)
    row = fastsearch.vote(keys[None], scores[None], method=method, mask=mask[None], backend=backend)
    assert winner.shape == () and winner.dtype == torch.int64
    _assert_same(winner, row[0])
    _assert_same(winner, fastsearch.vote(keys, scores, method=method, mask=mask, backend="torch"))
    assert -1 <= int(winner) < size


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_vote_one_group_ties(device, backend):
    keys = torch.tensor([5, 9, 9, 5, 2], device=device)  # 5 and 9 tie at two votes; 9 reaches two first
    _assert_same(fastsearch.vote(keys, backend=backend), torch.tensor(1, device=device))
    scores = torch.tensor([1.0, 0.5, 0.5, 0.0, 1.0], device=device)  # weighted tie 1.0 / 1.0 / 1.0: first seen
    _assert_same(fastsearch.vote(keys, scores, method="weighted", backend=backend), torch.tensor(0, device=device))
    _assert_same(fastsearch.vote(keys, scores, method="max", backend=backend), torch.tensor(0, device=device))


# -- ensemble_scores --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["rank", "zscore"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ensemble_scores_one_group(device, backend, size, method, dtype):
    """1-D scores are one verifier's scores of one group: a score per candidate, [N]."""
    scores = _tied_scores(size, seed=size, dtype=dtype).to(device)
    out = fastsearch.ensemble_scores(scores, method=method, backend=backend)
    row = fastsearch.ensemble_scores(scores[None], method=method, backend=backend)
    one_group = fastsearch.ensemble_scores(scores, method=method, offsets=torch.tensor([0, size], device=device),
                                           backend=backend)
    assert out.shape == (size,) and out.dtype == torch.float32
    _assert_same(out, row)
    _assert_same(out, one_group)
    if method == "rank":  # mean ranks of a permutation of 1..N
        assert out.sum().item() == pytest.approx(size * (size + 1) / 2)


# -- empty 1-D input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_empty_one_group(device, backend):
    """0 candidates: the same result (or error) as the [1, 0] row, group dimension dropped."""
    empty = torch.empty(0, device=device)
    values, indices = fastsearch.segmented_topk(empty, 3, backend=backend)
    row = fastsearch.segmented_topk(empty[None], 3, backend=backend)
    _assert_same(values, row[0][0])
    _assert_same(indices, torch.full((3,), -1, device=device))

    out = fastsearch.beam_prune(empty, 2, refill_to=3, backend=backend)
    row = fastsearch.beam_prune(empty[None], 2, refill_to=3, backend=backend)
    for got, expected in zip(out, row, strict=True):
        _assert_same(got, expected[0])
    assert int(out.counts) == 0 and out.parents.shape == (3,)

    ess = fastsearch.effective_sample_size(empty, backend=backend)
    _assert_same(ess, torch.tensor(0.0, device=device))

    keys = torch.empty(0, dtype=torch.int64, device=device)
    _assert_same(fastsearch.vote(keys, backend=backend), torch.tensor(-1, device=device))
    _assert_same(fastsearch.vote(keys, empty, method="max", backend=backend), torch.tensor(-1, device=device))

    _assert_same(fastsearch.ensemble_scores(empty, backend=backend), torch.empty(0, device=device))

    for log_weights in (empty, empty[None]):  # nothing to draw from: the same error either way
        with pytest.raises(ValueError, match="log_weights: group 0 has no candidate"):
            fastsearch.resample(log_weights, 4, seed=0, backend=backend)


# -- what stays as it was ------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_one_group_bad_input(device, backend):
    scores = torch.randn(6, device=device)
    with pytest.raises(ValueError, match=r"mask has shape \[5\] but scores has shape \[6\]"):
        fastsearch.segmented_topk(scores, 2, mask=torch.ones(5, dtype=torch.bool, device=device), backend=backend)
    with pytest.raises(ValueError, match="finished"):
        fastsearch.beam_prune(scores, 2, finished=torch.ones(1, 6, dtype=torch.bool, device=device),
                              backend=backend)
    with pytest.raises(TypeError, match="mask"):
        fastsearch.segmented_topk(scores, 2, mask=torch.ones(6, device=device), backend=backend)
    with pytest.raises(ValueError, match="scores"):
        fastsearch.vote(torch.zeros(6, dtype=torch.int64, device=device), torch.ones(4, device=device),
                        method="max", backend=backend)
    with pytest.raises(ValueError, match="k"):
        fastsearch.segmented_topk(scores, 0, backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        fastsearch.resample(torch.tensor([0.0, NAN], device=device), 2, seed=0, backend=backend)
    # 0-d and 3-D inputs are still not groups
    with pytest.raises(ValueError, match=r"\[G, C\]"):
        fastsearch.segmented_topk(torch.tensor(1.0, device=device), 1, backend=backend)
    with pytest.raises(ValueError, match=r"\[G, C\]"):
        fastsearch.effective_sample_size(torch.zeros(2, 3, 4, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_dense_and_ragged_shapes_unchanged(device, backend):
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2], device=device)
    offsets = torch.tensor([0, 3, 5], device=device)
    values, indices = fastsearch.segmented_topk(scores, 2, offsets=offsets, backend=backend)
    _assert_same(indices, torch.tensor([[1, 2], [3, 4]], device=device))
    assert fastsearch.resample(scores, 4, offsets=offsets, seed=0, backend=backend).shape == (2, 4)
    assert fastsearch.effective_sample_size(scores[None], backend=backend).shape == (1,)
    # a ragged single group keeps its group dimension: only offsets=None means "drop it"
    one = torch.tensor([0, 5], device=device)
    assert fastsearch.segmented_topk(scores, 2, offsets=one, backend=backend).values.shape == (1, 2)
    assert fastsearch.vote(scores.long(), offsets=one, backend=backend).shape == (1,)
    assert fastsearch.beam_prune(scores, 2, offsets=one, backend=backend).counts.shape == (1,)
