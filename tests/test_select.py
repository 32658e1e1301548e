"""Selection ops: every backend against the reference on dense and ragged groups, and the reference
against plain-Python definitions (ties, NaN, -inf, empty groups, k = 1, k = group size, k > size)."""

import math

import pytest
import torch
from helpers import ALL_BACKENDS, KERNEL_BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsearch

NAN, INF = float("nan"), float("inf")


def _offsets(sizes, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), dtype=torch.int64, device=device)


def _ragged_scores(sizes, seed, ties=True, specials=True, dtype=torch.float32):
    """Scores with repeated values (ties), NaN and -inf sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    scores = torch.randint(0, 6 if ties else 1 << 20, (total,), generator=g).float() / 4
    if specials and total:
        special = torch.rand(total, generator=g)
        scores[special < 0.08] = NAN
        scores[(special >= 0.08) & (special < 0.14)] = -INF
    return scores.to(dtype)


# -- plain-Python definitions -------------------------------------------------------------------------


def _plain_topk(values, k, largest, selectable):
    items = [(v, i) for i, v in enumerate(values) if selectable[i] and not math.isnan(v)]
    items.sort(key=lambda item: (-item[0] if largest else item[0], item[1]))
    chosen = items[:k]
    pad = -INF if largest else INF
    return [v for v, _ in chosen] + [pad] * (k - len(chosen)), [i for _, i in chosen] + [-1] * (k - len(chosen))


def _plain_vote(keys, scores, selectable, method):
    voters = [i for i in range(len(keys)) if selectable[i] and (method == "majority" or not math.isnan(scores[i]))]
    if not voters:
        return -1
    first = {}
    for i in voters:
        first.setdefault(keys[i], i)
    if method == "majority":
        counts, best, winner = {}, 0, None
        top = max(sum(1 for j in voters if keys[j] == keys[i]) for i in voters)
        for i in voters:
            counts[keys[i]] = counts.get(keys[i], 0) + 1
            if counts[keys[i]] == top and winner is None:
                winner = keys[i]
        return first[winner]
    if method == "weighted":
        totals = {}
        for i in voters:
            totals[keys[i]] = totals.get(keys[i], 0.0) + scores[i]
        best = max(totals.values())
        return min(first[key] for key, total in totals.items() if total == best)
    best_i = min(voters, key=lambda i: (-scores[i], i))
    return first[keys[best_i]]


# -- reference against the plain definitions ----------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6), k=st.integers(1, 10), largest=st.booleans(),
       seed=st.integers(0, 1000))
def test_reference_topk_is_plain_sort(sizes, k, largest, seed):
    scores = _ragged_scores(sizes, seed)
    mask = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed)) > 0.1
    values, indices = fastsearch.segmented_topk(scores, k, offsets=_offsets(sizes), mask=mask, largest=largest,
                                                backend="torch")
    start = 0
    for g, size in enumerate(sizes):
        plain_values, plain_index = _plain_topk(scores[start:start + size].tolist(), k, largest,
                                                mask[start:start + size].tolist())
        assert indices[g].tolist() == [i + start if i >= 0 else -1 for i in plain_index]
        assert values[g].tolist() == plain_values
        start += size


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 8), min_size=1, max_size=5),
       method=st.sampled_from(["majority", "weighted", "max"]), seed=st.integers(0, 1000))
def test_reference_vote_is_plain_vote(sizes, method, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 3, (sum(sizes),), generator=g)
    scores = _ragged_scores(sizes, seed + 1, specials=False)
    scores[torch.rand(len(scores), generator=g) < 0.1] = NAN
    mask = torch.rand(len(scores), generator=g) > 0.15
    winners = fastsearch.vote(keys, scores, method=method, offsets=_offsets(sizes), mask=mask, backend="torch")
    start = 0
    for group, size in enumerate(sizes):
        plain = _plain_vote(keys[start:start + size].tolist(), scores[start:start + size].tolist(),
                            mask[start:start + size].tolist(), method)
        assert winners[group].item() == (plain + start if plain >= 0 else -1)
        start += size


def test_reference_beam_prune_semantics():
    scores = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.8, 0.3, 0.2, 0.4])
    offsets = torch.tensor([0, 4, 6, 6, 8])
    finished = torch.tensor([False, False, False, True, False, False, True, True])
    keys = torch.tensor([1, 2, 2, 3, 4, 4, 5, 6])
    sel = fastsearch.beam_prune(scores, 2, offsets=offsets, finished=finished, dedup_keys=keys, refill_to=5,
                                backend="torch")
    assert sel.indices.tolist() == [[1, 0], [4, -1], [-1, -1], [-1, -1]]  # 2 is a duplicate of 1; 3 finished
    assert sel.counts.tolist() == [2, 1, 0, 0]
    assert sel.parents.tolist() == [[1, 0, 1, 0, 1], [4] * 5, [-1] * 5, [-1] * 5]
    lengths = torch.tensor([1, 4, 1, 1, 1, 1, 1, 1])
    penalised = fastsearch.beam_prune(scores, 1, offsets=offsets, lengths=lengths, length_penalty=1.0,
                                      backend="torch")
    assert penalised.indices[0].tolist() == [2]  # 0.9 / 4 drops below 0.9 / 1
    assert penalised.values[0].item() == pytest.approx(0.9)
    assert penalised.parents is None


# -- every backend against the reference --------------------------------------------------------------

RAGGED_SIZES = [[5, 0, 3, 1, 9, 16, 2], [1], [0, 0], [64] * 3 + [63, 1]]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes", RAGGED_SIZES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 16, 70])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_segmented_topk_ragged(device, backend, sizes, k, largest, dtype):
    scores = _ragged_scores(sizes, 3, dtype=dtype).to(device)
    offsets = _offsets(sizes, device)
    mask = (torch.arange(len(scores), device=device) % 7) != 3
    out = fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest, backend=backend)
    ref = fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest, backend="torch")
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[0], ref[0], equal_nan=False)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (8, 256), (5, 1000)], ids=str)
@pytest.mark.parametrize("k", [1, 4, 17])
def test_segmented_topk_dense_matches_torch_topk(device, backend, shape, k):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(shape, generator=g).to(device)
    values, indices = fastsearch.segmented_topk(scores, k, backend=backend)
    if k <= shape[1]:
        expected = torch.topk(scores, k, dim=-1)
        torch.testing.assert_close(values, expected.values)
        assert torch.equal(indices, expected.indices)  # no ties in random floats
    ref = fastsearch.segmented_topk(scores, k, backend="torch")
    assert torch.equal(indices, ref[1])


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes", RAGGED_SIZES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("options", ["plain", "finished", "lengths", "dedup", "all"])
def test_beam_prune_ragged(device, backend, sizes, k, options):
    g = torch.Generator().manual_seed(1)
    total = sum(sizes)
    scores = _ragged_scores(sizes, 4).to(device)
    kwargs = {}
    if options in ("finished", "all"):
        kwargs["finished"] = (torch.rand(total, generator=g) < 0.3).to(device)
    if options in ("lengths", "all"):
        kwargs["lengths"] = torch.randint(1, 50, (total,), generator=g).to(device)
        kwargs["length_penalty"] = 0.7
    if options in ("dedup", "all"):
        kwargs["dedup_keys"] = torch.randint(0, 4, (total,), generator=g).to(device)
    offsets = _offsets(sizes, device)
    out = fastsearch.beam_prune(scores, k, offsets=offsets, refill_to=7, backend=backend, **kwargs)
    ref = fastsearch.beam_prune(scores, k, offsets=offsets, refill_to=7, backend="torch", **kwargs)
    for got, expected in zip(out, ref, strict=True):
        if got.dtype == torch.int64:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_beam_prune_dense(device, backend):
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 10, (6, 33), generator=g).float().to(device)
    finished = (torch.rand(6, 33, generator=g) < 0.2).to(device)
    finished[2] = True  # an all-finished group
    out = fastsearch.beam_prune(scores, 4, finished=finished, refill_to=8, backend=backend)
    ref = fastsearch.beam_prune(scores, 4, finished=finished, refill_to=8, backend="torch")
    for got, expected in zip(out, ref, strict=True):
        assert torch.equal(got, expected)
    assert out.counts[2].item() == 0 and torch.all(out.parents[2] == -1)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["multinomial", "systematic", "stratified", "residual"])
@pytest.mark.parametrize("sizes,num_samples", [([5, 1, 9, 33], 16), ([3], 1), ([100] * 4, 100)], ids=str)
def test_resample_matches_reference(device, backend, method, sizes, num_samples):
    g = torch.Generator().manual_seed(5)
    log_weights = torch.randn(sum(sizes), generator=g) * 2
    log_weights[torch.rand(sum(sizes), generator=g) < 0.2] = -INF
    offsets = _offsets(sizes)
    log_weights[offsets[:-1]] = 0.0  # every group keeps a live candidate
    log_weights, offsets = log_weights.to(device), offsets.to(device)
    out = fastsearch.resample(log_weights, num_samples, method=method, offsets=offsets, seed=77, backend=backend)
    ref = fastsearch.resample(log_weights, num_samples, method=method, offsets=offsets, seed=77, backend="torch")
    again = fastsearch.resample(log_weights, num_samples, method=method, offsets=offsets, seed=77, backend=backend)
    assert torch.equal(out, again)  # reproducible from the seed
    # Rounding may move a draw across a CDF boundary in rare cases; anything beyond that is a bug.
    assert (out != ref).float().mean().item() <= 0.01


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("method", ["systematic", "residual"])
def test_resample_low_variance_counts(device, backend, method):
    """Systematic and residual resampling give each candidate floor or ceil of N w copies."""
    g = torch.Generator().manual_seed(6)
    weights = torch.rand(8, 50, generator=g) ** 3
    log_weights = torch.log(weights).to(device)
    n = 64
    ancestors = fastsearch.resample(log_weights, n, method=method, seed=1, backend=backend).cpu()
    expected = n * weights / weights.sum(-1, keepdim=True)
    counts = torch.zeros(8 * 50, dtype=torch.long).index_add_(0, ancestors.reshape(-1), torch.ones(8 * n,
                                                                                                 dtype=torch.long))
    counts = counts.view(8, 50).float()
    assert torch.all(counts >= torch.floor(expected) - (1e-4 if method == "systematic" else 0))
    if method == "systematic":
        assert torch.all(counts <= torch.ceil(expected) + 1e-4)
    assert torch.all(ancestors // 50 == torch.arange(8)[:, None])  # flat indices stay inside their group


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_resample_multinomial_chi_square(device, backend):
    weights = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])
    n = 20000 if backend != "triton" or device == "cuda" else 4000
    ancestors = fastsearch.resample(torch.log(weights)[None].to(device), n, method="multinomial", seed=3,
                                    backend=backend).cpu()
    counts = torch.bincount(ancestors[0], minlength=5).double()
    chi2 = (((counts - n * weights.double()) ** 2) / (n * weights.double())).sum().item()
    assert chi2 < 18.47  # 99.9% quantile of chi-square with 4 degrees of freedom


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_effective_sample_size(device, backend):
    log_weights = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, -INF, -INF, -INF, 1.0, 2.0, 3.0])
    offsets = torch.tensor([0, 4, 5, 7, 7, 11])
    ess = fastsearch.effective_sample_size(log_weights.to(device), offsets=offsets.to(device), backend=backend)
    w = torch.exp(torch.tensor([-INF, 1.0, 2.0, 3.0]))
    expected = [4.0, 1.0, 0.0, 0.0, (w.sum() ** 2 / (w * w).sum()).item()]
    torch.testing.assert_close(ess.cpu(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["majority", "weighted", "max"])
@pytest.mark.parametrize("sizes", RAGGED_SIZES, ids=str)
def test_vote_matches_reference(device, backend, method, sizes):
    g = torch.Generator().manual_seed(7)
    total = sum(sizes)
    keys = torch.randint(0, 5, (total,), generator=g).to(device)
    scores = (torch.randint(0, 4, (total,), generator=g).float() / 4).to(device)  # integer-ish: exact ties
    mask = (torch.rand(total, generator=g) > 0.1).to(device)
    offsets = _offsets(sizes, device)
    out = fastsearch.vote(keys, scores, method=method, offsets=offsets, mask=mask, backend=backend)
    ref = fastsearch.vote(keys, scores, method=method, offsets=offsets, mask=mask, backend="torch")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_sequence_keys(device, backend):
    tokens = torch.tensor([1, 2, 3, 1, 2, 3, 3, 2, 1, 7, 1, 2], device=device)
    offsets = torch.tensor([0, 3, 6, 9, 9, 10, 12], device=device)
    keys = fastsearch.sequence_keys(tokens, offsets=offsets, backend=backend)
    assert keys.dtype == torch.int64 and keys.shape == (6,)
    assert keys[0] == keys[1]  # equal sequences, equal keys
    assert len(set(keys.tolist())) == 5  # order matters, lengths matter
    assert keys[5] != keys[0]  # a prefix differs from the whole
    ref = fastsearch.sequence_keys(tokens, offsets=offsets, backend="torch")
    assert torch.equal(keys, ref)
    assert torch.equal(fastsearch.sequence_keys(tokens.int(), offsets=offsets, backend=backend), ref)


def test_sequence_keys_spread():
    """Many distinct short sequences: no collisions, and key bits look balanced."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (40000,), generator=g)
    offsets = torch.arange(0, 40001, 4)
    keys = fastsearch.sequence_keys(tokens, offsets=offsets, backend="torch")
    distinct = len(set(map(tuple, tokens.view(-1, 4).tolist())))
    assert len(set(keys.tolist())) == distinct
    bits = ((keys[:, None] >> torch.arange(64)) & 1).float().mean(0)
    assert torch.all((bits - 0.5).abs() < 0.03)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_selection_bad_input(device, backend):
    scores = torch.randn(10, device=device)
    offsets = torch.tensor([0, 4, 10], device=device)
    with pytest.raises(ValueError, match="k"):
        fastsearch.segmented_topk(scores, 0, offsets=offsets, backend=backend)
    if device == "cpu":
        with pytest.raises(ValueError, match="non-decreasing"):
            fastsearch.segmented_topk(scores, 2, offsets=torch.tensor([0, 6, 4, 10]), backend=backend)
        with pytest.raises(ValueError, match="end at T"):
            fastsearch.segmented_topk(scores, 2, offsets=torch.tensor([0, 4, 9]), backend=backend)
    with pytest.raises(TypeError, match="offsets"):
        fastsearch.segmented_topk(scores, 2, offsets=offsets.int(), backend=backend)
    with pytest.raises(ValueError, match="lengths"):
        fastsearch.beam_prune(scores, 2, offsets=offsets, lengths=torch.ones(9, device=device), backend=backend)
    with pytest.raises(TypeError, match="answer_keys"):
        fastsearch.vote(scores, offsets=offsets, backend=backend)
    with pytest.raises(ValueError, match="scores"):
        fastsearch.vote(torch.zeros(10, dtype=torch.int64, device=device), method="weighted", offsets=offsets,
                        backend=backend)
    dead = torch.tensor([0.0, 1.0, -INF, -INF], device=device)
    with pytest.raises(ValueError, match="group 1"):
        fastsearch.resample(dead, 3, offsets=torch.tensor([0, 2, 4], device=device), seed=0, backend=backend)
    with pytest.raises(ValueError, match="method"):
        fastsearch.resample(scores[None], 3, method="bogus", seed=0, backend=backend)
    with pytest.raises(TypeError, match="token_ids"):
        fastsearch.sequence_keys(scores, offsets=offsets, backend=backend)
