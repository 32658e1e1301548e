"""Groups past the sizes where the kernels change paths (issue 12, finding 8), and vote's float64 contract
(finding 6).

The other tests' largest group is about 130 candidates, so these paths ran nowhere before:
- CUDA selection: groups over kCapacity = 2048 stream through shared memory (segmented_topk / beam_prune cut
  to kKeep = 1024 per round, several rounds when k > 1024; beam_prune's dedup scans the whole group;
  vote's majority / weighted tally scans the group, ``tally_scan``); resample and effective_sample_size
  walk a group in 1024-candidate tiles; ensemble ranks tile the group through shared memory past 4096.
- Triton selection: groups over ``LARGE_GROUP`` take the tiled path (one compiled kernel for every size
  past it) instead of a register block of the whole group.
Every backend that runs here (the CPU kernels, Triton under the interpreter, CUDA and compiled Triton where
a GPU exists) is compared with the torch reference at those sizes. The sizes are a little past each
threshold and the groups few, so each case takes a few seconds under the interpreter.
"""

import pytest
import torch
from helpers import KERNEL_BACKENDS

import fastsearch

NAN, INF = float("nan"), float("inf")
# Past the CUDA top-k capacity (2048), the CUDA resample tile (1024) twice over, and the CUDA rank tile (4096).
BIG = 4500
HUGE = 9000  # past 8192: a Triton block this size took 46 s to compile for sm_90


def _offsets(sizes, device):
    bounds = torch.tensor([0] + sizes).cumsum(0)
    return bounds.to(device)


def _scores(total, seed, levels=1 << 12):
    """Scores with ties (``levels`` distinct values), NaN and -inf sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (total,), generator=g).float() / 8
    special = torch.rand(total, generator=g)
    scores[special < 0.03] = NAN
    scores[(special >= 0.03) & (special < 0.05)] = -INF
    return scores


# -- segmented_topk, beam_prune -------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
# k past 1024 (CUDA kKeep, the compiled Triton tile) and past 4096 (the interpreted Triton tile): several rounds.
@pytest.mark.parametrize("k", [5, 4200], ids=["one-round", "several-rounds"])
def test_segmented_topk_large_groups(device, backend, k):
    sizes = [HUGE, 3, 0, BIG]  # large groups among small and empty ones: one launch serves all
    scores = _scores(sum(sizes), 1).to(device)
    offsets = _offsets(sizes, device)
    mask = (torch.arange(len(scores), device=device) % 11) != 4
    for largest in (True, False):
        out = fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest, backend=backend)
        ref = fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest, backend="torch")
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.values, ref.values)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_segmented_topk_large_dense_float64(device, backend):
    """Dense rows past the capacity; float64 scores that differ only beyond fp32 are ordered in fp64."""
    g = torch.Generator().manual_seed(2)
    scores = (1.0 + torch.randint(0, 64, (2, BIG), generator=g, dtype=torch.float64) * 2.0**-40).to(device)
    out = fastsearch.segmented_topk(scores, 40, backend=backend)
    ref = fastsearch.segmented_topk(scores, 40, backend="torch")
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.values, ref.values)
    assert torch.all(out.values[:, 0] > 1.0)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_beam_prune_large_groups_with_dedup(device, backend):
    sizes = [BIG, 7, 2600]
    total = sum(sizes)
    g = torch.Generator().manual_seed(3)
    scores = _scores(total, 4).to(device)
    kwargs = dict(finished=(torch.rand(total, generator=g) < 0.2).to(device),
                  lengths=torch.randint(1, 50, (total,), generator=g).to(device), length_penalty=0.7,
                  dedup_keys=torch.randint(0, 3000, (total,), generator=g).to(device))
    offsets = _offsets(sizes, device)
    for k in (1030,):  # past CUDA's kKeep = 1024: a second round
        out = fastsearch.beam_prune(scores, k, offsets=offsets, refill_to=2 * k + 1, backend=backend, **kwargs)
        ref = fastsearch.beam_prune(scores, k, offsets=offsets, refill_to=2 * k + 1, backend="torch", **kwargs)
        for name, got, expected in zip(out._fields, out, ref, strict=True):
            if got.dtype == torch.int64:
                assert torch.equal(got, expected), name
            else:  # length ** penalty: to within rounding (powf against pow)
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert out.counts[0].item() == k  # enough distinct keys survive the dedup to fill k, 1030 included


# -- resample, effective_sample_size ------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["multinomial", "systematic", "stratified", "residual"])
def test_resample_large_groups(device, backend, method):
    sizes = [BIG, 1, 2500]
    g = torch.Generator().manual_seed(5)
    log_weights = torch.randn(sum(sizes), generator=g) * 3
    log_weights[torch.rand(sum(sizes), generator=g) < 0.3] = -INF
    offsets = _offsets(sizes, "cpu")
    log_weights[offsets[:-1]] = 0.0  # every group keeps a live candidate
    log_weights, offsets = log_weights.to(device), offsets.to(device)
    num_samples = 3000
    out = fastsearch.resample(log_weights, num_samples, method=method, offsets=offsets, seed=9, backend=backend)
    ref = fastsearch.resample(log_weights, num_samples, method=method, offsets=offsets, seed=9, backend="torch")
    # Rounding may move a draw across a CDF boundary in rare cases; anything beyond that is a bug.
    assert (out != ref).float().mean().item() <= 0.002
    assert torch.all((out >= offsets[:-1, None]) & (out < offsets[1:, None]))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_effective_sample_size_large_groups(device, backend):
    sizes = [HUGE, 2, BIG, 0]
    g = torch.Generator().manual_seed(6)
    log_weights = torch.randn(sum(sizes), generator=g) * 2
    log_weights[torch.rand(sum(sizes), generator=g) < 0.1] = -INF
    log_weights[HUGE + 2 + 17] = NAN  # the third group holds a NaN: its ESS is NaN
    offsets = _offsets(sizes, device)
    out = fastsearch.effective_sample_size(log_weights.to(device), offsets=offsets, backend=backend)
    ref = fastsearch.effective_sample_size(log_weights.to(device), offsets=offsets, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0, equal_nan=True)
    assert torch.isnan(out[2]) and out[3] == 0


# -- vote -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["majority", "weighted", "max"])
def test_vote_large_groups(device, backend, method):
    sizes = [2300, 5, 2100]  # past the CUDA sort capacity: the scan tally
    total = sum(sizes)
    g = torch.Generator().manual_seed(7)
    keys = torch.randint(0, 40, (total,), generator=g).to(device)
    scores = (torch.randint(0, 4, (total,), generator=g).float() / 4).to(device)  # exact sums: ties
    mask = (torch.rand(total, generator=g) > 0.1).to(device)
    offsets = _offsets(sizes, device)
    out = fastsearch.vote(keys, scores, method=method, offsets=offsets, mask=mask, backend=backend)
    ref = fastsearch.vote(keys, scores, method=method, offsets=offsets, mask=mask, backend="torch")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS + [pytest.param("cpu", "torch", id="reference")])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e300 to fp32 under the interpreter
def test_vote_reads_float64_scores_as_fp32(device, backend):
    """Finding 6: every backend rounds float64 scores to fp32 once, so scores that differ only in fp64 tie."""
    tiny = 2.0**-40  # lost when 1 + tiny is rounded to fp32
    keys = torch.tensor([[7, 9, 9], [7, 9, 7], [3, 5, 5]], device=device)
    scores = torch.tensor([[1.0, 1.0 + tiny, 0.5],  # max: 1 + tiny wins in fp64, ties with 1.0 (index 0) in fp32
                           [1.0, 1.0 + tiny, 0.0],  # weighted: 9 leads by tiny in fp64; fp32 tie, 7 seen first
                           [1.0, 0.5 + tiny, 0.5]],  # weighted: 5 leads by tiny in fp64; fp32 tie, 3 seen first
                          dtype=torch.float64, device=device)
    assert fastsearch.vote(keys[:1], scores[:1], method="max", backend=backend).tolist() == [0]
    assert fastsearch.vote(keys[1:], scores[1:], method="weighted", backend=backend).tolist() == [0, 0]
    # The same in fp32 by hand: what each backend must agree with.
    as_fp32 = scores.float()
    assert fastsearch.vote(keys[1:], as_fp32[1:], method="weighted", backend=backend).tolist() == [0, 0]
    # And a float64 NaN does not vote, a float64 beyond the fp32 range votes as +inf.
    keys = torch.tensor([1, 2, 3], device=device)
    scores = torch.tensor([NAN, 1e300, 5.0], dtype=torch.float64, device=device)
    assert fastsearch.vote(keys, scores, method="max", backend=backend).item() == 1


# -- ensemble_scores (rank) -----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["rank", "zscore"])
def test_ensemble_scores_large_groups(device, backend, method):
    sizes = [4130, 3, 30]  # past the CUDA rank tile (4096)
    total = sum(sizes)
    g = torch.Generator().manual_seed(8)
    scores = (torch.randint(0, 500, (1, total), generator=g).float() / 16)
    scores[0, torch.rand(total, generator=g) < 0.02] = NAN
    scores = scores.to(device)
    offsets = _offsets(sizes, device)
    weights = torch.tensor([0.5], device=device)
    out = fastsearch.ensemble_scores(scores, offsets=offsets, method=method, weights=weights, backend=backend)
    ref = fastsearch.ensemble_scores(scores, offsets=offsets, method=method, weights=weights, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


# -- one compiled Triton kernel for every large size ---------------------------------------------------


def test_triton_large_groups_share_one_specialisation(monkeypatch):
    """Past LARGE_GROUP, every group size launches the same tiled kernel with the same constexprs and options,
    so the compiled kernel is reused (the one-block kernel would be compiled per power of two, 46 s at 8192 on
    sm_90, and not at all past 2^20). Launches are recorded, not run."""
    from fastsearch.kernels import select, select_large

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, tuple(sorted(kwargs.items()))))
            return launch

    for module, name in ((select, "_segmented_topk_kernel"), (select_large, "_segmented_topk_tiles_kernel"),
                         (select, "_vote_kernel"), (select_large, "_vote_tiles_kernel")):
        monkeypatch.setattr(module, name, Recorder(name))
    for size in (select.LARGE_GROUP + 1, 9000, 2**20 + 5):
        scores = torch.zeros(size)
        fastsearch.segmented_topk(torch.zeros(size + 1), 3, offsets=torch.tensor([0, 1, size + 1]), backend="triton")
        fastsearch.segmented_topk(scores[None], 3, backend="triton")  # dense [1, size]
        fastsearch.vote(torch.zeros(size, dtype=torch.int64), offsets=torch.tensor([0, size]), backend="triton")
    assert {name for name, _ in launches} == {"_segmented_topk_tiles_kernel", "_vote_tiles_kernel"}
    ragged, dense = {kw for name, kw in launches[0::3]}, {kw for name, kw in launches[1::3]}
    votes = {kw for name, kw in launches[2::3]}
    assert len(ragged) == len(dense) == len(votes) == 1, (ragged, dense, votes)
    launches.clear()
    fastsearch.segmented_topk(torch.zeros(select.LARGE_GROUP), 3, backend="triton")
    assert [name for name, _ in launches] == ["_segmented_topk_kernel"]  # up to the threshold: one block
