"""Hostile input to the selection and scoring ops (issue 18): every backend here agrees with the reference
on strided, empty, NaN / inf and bad input, and refuses bad arguments with an error naming them.

The selection ops: segmented_topk, beam_prune, resample, effective_sample_size, vote, sequence_keys; the
scoring ops: prm_step_scores, aggregate_steps, prm_scores, cosine_scores, ensemble_scores. Contract:
csrc/README.md ("Selection ops", "Scoring ops").
"""

import math

import pytest
import torch

import fastsearch as fs
from tests.helpers import backends_for

BACKENDS = backends_for("cpu")
INF, NAN = math.inf, math.nan
EMPTY = torch.empty


def _every_backend(call):
    """{backend: result or the exception raised} of ``call(backend)`` for every backend here."""
    found = {}
    for backend in BACKENDS:
        try:
            found[backend] = call(backend)
        except (TypeError, ValueError) as error:
            found[backend] = error
    return found


def _same(a, b) -> bool:
    """Equal shape, dtype and values (floats to 1e-6), NaN equal to NaN; tuples element by element."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # fp32 math in another order: rounding only
        return torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6, equal_nan=True)
    return torch.equal(a, b)


def assert_all_agree(call):
    """Every backend returns what the reference returns (indices exactly, floats to rounding, NaN equal to NaN),
    or raises as it does, with the same message."""
    found = _every_backend(call)
    reference = found["torch"]
    for backend, result in found.items():
        if isinstance(reference, Exception):
            assert type(result) is type(reference) and str(result) == str(reference), (backend, result, reference)
        else:
            assert not isinstance(result, Exception), (backend, result)
            assert _same(tuple(result) if isinstance(result, tuple) else result,
                         tuple(reference) if isinstance(reference, tuple) else reference), (backend, result, reference)
    return reference


# -- item 1: strided, expanded and transposed inputs ---------------------------------------------------


def test_sequence_keys_reads_non_contiguous_offsets():
    tokens = torch.arange(4)
    strided = torch.tensor([0, 9, 2, 9, 4, 9])[::2]  # [0, 2, 4] with stride 2
    expected = fs.sequence_keys(tokens, offsets=torch.tensor([0, 2, 4]), backend="torch")
    for backend in BACKENDS:
        assert torch.equal(fs.sequence_keys(tokens, offsets=strided, backend=backend), expected), backend


def test_sequence_keys_reads_expanded_zero_length_offsets():
    """Stride-0 offsets (every sequence empty) crashed Triton: it read past the one stored element."""
    offsets = torch.zeros(1, dtype=torch.int64).expand(5)
    for backend in BACKENDS:
        keys = fs.sequence_keys(EMPTY(0, dtype=torch.int64), offsets=offsets, backend=backend)
        assert torch.equal(keys, torch.zeros(4, dtype=torch.int64)), backend  # mix(0 ^ 0) == 0


def test_transposed_tokens_and_expanded_rows():
    tokens = torch.arange(12).view(3, 4)
    assert_all_agree(lambda b: fs.sequence_keys(tokens.t(), backend=b))
    assert_all_agree(lambda b: fs.sequence_keys(tokens[:1].expand(3, 4), backend=b))


STRIDED_SELECTION = {
    "topk_mask_t": lambda b: fs.segmented_topk(torch.arange(6.).view(2, 3), 2,
                                               mask=torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool).t(),
                                               backend=b),
    "topk_scores_t": lambda b: fs.segmented_topk(torch.tensor([[3., 1.], [NAN, 2.], [5., 5.]]).t(), 2, backend=b),
    "topk_offsets_strided": lambda b: fs.segmented_topk(torch.arange(6.), 2,
                                                        offsets=torch.tensor([0, 9, 3, 9, 6])[::2], backend=b),
    "beam_all_strided": lambda b: fs.beam_prune(
        torch.tensor([[1., 4.], [2., 4.], [3., 0.]]).t(), 2, finished=torch.tensor([[0, 1], [0, 0], [0, 0]]).bool().t(),
        lengths=torch.arange(1, 7).view(3, 2).t(), length_penalty=0.5,
        dedup_keys=torch.tensor([[7, 8], [7, 8], [1, 2]]).t(), refill_to=3, backend=b),
    "beam_expanded": lambda b: fs.beam_prune(torch.tensor([1., 2., 3.]).expand(2, 3), 2,
                                             dedup_keys=torch.tensor([5]).expand(2, 3), backend=b),
    "resample_t": lambda b: fs.resample(torch.tensor([[0., 1.], [2., -INF], [0.5, 0.]]).t(), 5, seed=3,
                                        method="multinomial", backend=b),
    "resample_offsets_strided": lambda b: fs.resample(torch.tensor([0., 1., 2.]), 4,
                                                      offsets=torch.tensor([0, 5, 1, 5, 3])[::2], seed=1, backend=b),
    "ess_expanded": lambda b: fs.effective_sample_size(torch.tensor([0., 1., 2.]).expand(4, 3), backend=b),
    "vote_strided": lambda b: fs.vote(torch.tensor([[1, 2], [2, 2], [1, 1]]).t(),
                                      torch.tensor([[0.5, 1.], [1., 0.25], [0.25, 3.]]).t(), method="weighted",
                                      mask=torch.tensor([[1, 1], [1, 0], [1, 1]]).bool().t(), backend=b),
    "vote_offsets_strided": lambda b: fs.vote(torch.tensor([1, 2, 2, 1]),
                                              offsets=torch.tensor([0, 7, 3, 7, 4])[::2], backend=b),
}


@pytest.mark.parametrize("case", sorted(STRIDED_SELECTION))
def test_strided_selection_inputs_agree(case):
    assert_all_agree(STRIDED_SELECTION[case])


_G = torch.Generator().manual_seed(0)
_HIDDEN = torch.randn(6, 4, generator=_G)
_HEAD = torch.randn(2, 4, generator=_G)
_EMB = torch.randn(5, 3, generator=_G)
_REFS = torch.randn(2, 3, generator=_G)
_VOTES = torch.randn(5, 2, generator=_G)

STRIDED_SCORING = {
    "prm_positions_strided": lambda b: fs.prm_scores(_HIDDEN, torch.tensor([0, 9, 2, 9, 5, 9])[::2], _HEAD,
                                                     offsets=torch.tensor([0, 9, 1, 9, 3, 9])[::2], backend=b),
    "prm_hidden_expanded": lambda b: fs.prm_step_scores(_HIDDEN[:1].expand(6, 4), torch.tensor([0, 5]),
                                                        _HEAD.t().contiguous().t(), backend=b),
    "aggregate_t": lambda b: fs.aggregate_steps(torch.arange(12.).view(3, 4).t() / 12, method="logit_sum", backend=b),
    "cosine_groups_strided": lambda b: fs.cosine_scores(_EMB.t().contiguous().t(), _REFS[:, None].expand(2, 2, 3)[:, 0],
                                                        offsets=torch.tensor([0, 9, 2, 9, 5])[::2], backend=b),
    "ensemble_t": lambda b: fs.ensemble_scores(_VOTES.t(), offsets=torch.tensor([0, 9, 2, 9, 5])[::2],
                                               weights=torch.tensor([1., 9., 2.])[::2], backend=b),
}


@pytest.mark.parametrize("case", sorted(STRIDED_SCORING))
def test_strided_scoring_inputs_agree(case):
    found = _every_backend(STRIDED_SCORING[case])
    reference = found["torch"]
    for backend, result in found.items():
        for got, want in zip(result if isinstance(result, tuple) else (result,),
                             reference if isinstance(reference, tuple) else (reference,), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=backend)


# -- item 2: bad offsets never read out of bounds -------------------------------------------------------

BAD_OFFSETS = [torch.tensor([0, 7, 6]), torch.tensor([0, -1, 6]), torch.tensor([1, 6]), torch.tensor([0, 3, 5]),
               torch.tensor([0, 4, 2, 6])]
OFFSET_OPS = {
    "segmented_topk": lambda o, b: fs.segmented_topk(torch.arange(6.), 2, offsets=o, backend=b),
    "beam_prune": lambda o, b: fs.beam_prune(torch.arange(6.), 2, offsets=o, backend=b),
    "resample": lambda o, b: fs.resample(torch.zeros(6), 2, offsets=o, seed=0, backend=b),
    "effective_sample_size": lambda o, b: fs.effective_sample_size(torch.zeros(6), offsets=o, backend=b),
    "vote": lambda o, b: fs.vote(torch.zeros(6, dtype=torch.int64), offsets=o, backend=b),
    "sequence_keys": lambda o, b: fs.sequence_keys(torch.zeros(6, dtype=torch.int64), offsets=o, backend=b),
    "aggregate_steps": lambda o, b: fs.aggregate_steps(torch.zeros(6), offsets=o, backend=b),
    "cosine_scores": lambda o, b: fs.cosine_scores(torch.ones(6, 2), torch.ones(o.numel() - 1, 2), offsets=o,
                                                   backend=b),
    "ensemble_scores": lambda o, b: fs.ensemble_scores(torch.zeros(2, 6), offsets=o, backend=b),
}


@pytest.mark.parametrize("op", sorted(OFFSET_OPS))
@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_offsets_are_value_errors(op, offsets, backend):
    with pytest.raises(ValueError, match="offsets"):
        OFFSET_OPS[op](offsets, backend)


def test_triton_selection_launchers_check_offsets_themselves():
    """On a GPU the Python check leaves offset values to the launchers, which read the sizes anyway."""
    kernels = pytest.importorskip("fastsearch.kernels.select")
    if "triton" not in BACKENDS:
        pytest.skip("no Triton here")
    scores = torch.arange(6.)
    for offsets in BAD_OFFSETS:
        with pytest.raises(ValueError, match="offsets"):
            kernels.segmented_topk(scores, offsets, None, 2, True)
        with pytest.raises(ValueError, match="offsets"):
            kernels.resample(scores, offsets, 2, 0, 0)


def test_triton_kernels_clamp_unchecked_offsets():
    """sequence_keys and ensemble_scores launch without reading offsets: bounds are clamped into [0, T]
    as the CUDA kernels clamp them, never read out of bounds."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton here")
    from fastsearch.kernels import score as score_kernels
    from fastsearch.kernels import select as select_kernels

    tokens = torch.arange(4)
    keys = select_kernels.sequence_keys(tokens, torch.tensor([-3, 9, 4]))  # clamped: [0, 4), [4, 4)
    assert torch.equal(keys, fs.sequence_keys(tokens, offsets=torch.tensor([0, 4, 4]), backend="torch"))
    scores = torch.tensor([[3., 1., 2., 5.]])
    ranks = score_kernels.ensemble_scores(scores, torch.tensor([-5, 2, 99]), 0, None)  # clamped: [0, 2), [2, 4)
    assert torch.equal(ranks, fs.ensemble_scores(scores, offsets=torch.tensor([0, 2, 4]), backend="torch"))
    # rows but no group: no reference row to read and nothing to rank; NaN, not a read past the data
    assert score_kernels.ensemble_scores(scores, torch.tensor([0]), 0, None).isnan().all()
    assert score_kernels.cosine_scores(torch.ones(3, 2), torch.ones(0, 2), torch.tensor([0])).isnan().all()


# -- item 3: +inf and NaN log-weights -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [INF, NAN])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resample_refuses_nan_and_plus_inf_log_weights(bad, backend):
    with pytest.raises(ValueError, match=r"log_weights contain NaN or \+inf \(group 1\)"):
        fs.resample(torch.tensor([[0., 1., 2.], [0., bad, 1.]]), 4, seed=0, backend=backend)
    # reported before a dead group, whichever comes first
    with pytest.raises(ValueError, match="log_weights contain NaN or"):
        fs.resample(torch.tensor([[-INF, -INF], [bad, 0.]]), 4, seed=0, backend=backend)


def test_resample_native_op_refuses_plus_inf():
    if "cpu" not in BACKENDS:
        pytest.skip("no CPU kernels here")
    with pytest.raises(ValueError, match="log_weights"):
        torch.ops.fastsearch.resample(torch.tensor([[0., INF, 1.]]), None, 4, 1, 0)


@pytest.mark.parametrize("log_weights, expected", [
    ([[0., NAN, 1.]], [NAN]), ([[0., INF, 1.]], [NAN]), ([[INF, INF]], [NAN]), ([[-INF, -INF]], [0.]),
    ([[-INF, NAN]], [NAN]), ([[0., 0.]], [2.])])
def test_effective_sample_size_of_nan_and_inf(log_weights, expected):
    result = assert_all_agree(lambda b: fs.effective_sample_size(torch.tensor(log_weights), backend=b))
    torch.testing.assert_close(result, torch.tensor(expected), equal_nan=True)


# -- item 4: NaN consistency ----------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [NAN, INF, -INF])
@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_prune_refuses_non_finite_length_penalty(penalty, backend):
    with pytest.raises(ValueError, match="length_penalty must be finite"):
        fs.beam_prune(torch.tensor([[1., 2.]]), 1, lengths=torch.tensor([[1, 2]]), length_penalty=penalty,
                      backend=backend)


def test_beam_prune_native_op_refuses_nan_length_penalty():
    if "cpu" not in BACKENDS:
        pytest.skip("no CPU kernels here")
    with pytest.raises(ValueError, match="length_penalty"):
        torch.ops.fastsearch.beam_prune(torch.tensor([[1., 2.]]), None, 1, None, torch.tensor([[1, 2]]), NAN, None, 0)


@pytest.mark.parametrize("keys, scores, expected", [
    ([0, 1, 1], [INF, -INF, INF], 0),  # answer 1 sums to NaN: answer 0 (+inf) wins
    ([1, 1, 2], [INF, -INF, -INF], 2),  # a NaN sum loses even to -inf
    ([1, 1, 2, 2], [INF, -INF, -INF, INF], 0),  # only NaN sums: the first answer
])
def test_weighted_vote_nan_sums_lose(keys, scores, expected):
    result = assert_all_agree(lambda b: fs.vote(torch.tensor([keys]), torch.tensor([scores]), method="weighted",
                                                backend=b))
    assert result.tolist() == [expected]


def _sprinkle(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ties, NaN, +inf and -inf in a quarter of the entries."""
    special = torch.tensor([NAN, INF, -INF, 0.5, 0.5])
    pick = torch.randint(0, 5, values.shape, generator=generator)
    use = torch.rand(values.shape, generator=generator) < 0.25
    return torch.where(use, special[pick], values)


@pytest.mark.parametrize("seed", range(12))
def test_random_nan_inf_inputs_agree(seed):
    g = torch.Generator().manual_seed(seed)
    groups, size = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    scores = _sprinkle(torch.randn(groups, size, generator=g), g)
    sizes = torch.randint(0, 4, (groups,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    flat = _sprinkle(torch.randn(int(offsets[-1]), generator=g), g)
    keys = torch.randint(0, 3, (groups, size), generator=g)
    mask = torch.rand(groups, size, generator=g) < 0.8
    lengths = torch.randint(1, 5, (groups, size), generator=g)
    for largest in (True, False):
        assert_all_agree(lambda b, largest=largest: fs.segmented_topk(scores, 3, mask=mask, largest=largest,
                                                                       backend=b))
        assert_all_agree(lambda b, largest=largest: fs.segmented_topk(flat, 2, offsets=offsets, largest=largest,
                                                                       backend=b))
    assert_all_agree(lambda b: fs.beam_prune(scores, 2, lengths=lengths, length_penalty=0.7, dedup_keys=keys,
                                             finished=~mask, refill_to=3, backend=b))
    assert_all_agree(lambda b: fs.beam_prune(flat, 2, offsets=offsets, refill_to=2, backend=b))
    assert_all_agree(lambda b: fs.effective_sample_size(scores, backend=b))
    assert_all_agree(lambda b: fs.effective_sample_size(flat, offsets=offsets, backend=b))
    for method in ("multinomial", "systematic", "stratified", "residual"):
        assert_all_agree(lambda b, method=method: fs.resample(scores, 4, method=method, seed=seed, backend=b))
        assert_all_agree(lambda b, method=method: fs.resample(flat, 3, offsets=offsets, method=method, seed=seed,
                                                                  backend=b))
    for method in ("majority", "weighted", "max"):
        assert_all_agree(lambda b, method=method: fs.vote(keys, scores, method=method, mask=mask, backend=b))
    for method in ("last", "min", "max", "prod", "mean", "logit_sum"):
        found = _every_backend(lambda b, method=method: fs.aggregate_steps(flat.abs() / 4, offsets=offsets,
                                                                           method=method, empty=-1.0, backend=b))
        for result in found.values():
            torch.testing.assert_close(result, found["torch"], equal_nan=True, atol=1e-5, rtol=1e-5)
    for method in ("rank", "zscore"):
        found = _every_backend(lambda b, method=method: fs.ensemble_scores(scores, method=method, backend=b))
        for result in found.values():
            torch.testing.assert_close(result, found["torch"], equal_nan=True, atol=1e-5, rtol=1e-5)


def test_zscore_of_close_scores_is_computed_in_fp64():
    """The CPU kernel rounded the mean to fp32, onto one of two scores an ulp apart: z 0 and 1.73, not -0.71
    and 1.41 (the contract: sums, mean, std and z in fp64)."""
    scores = torch.tensor([[10000.0, 10000.001, 10000.0], [2.8572845459, 2.7476937771, INF]])
    expected = torch.tensor([-0.5 ** 0.5, 2 ** 0.5, -0.5 ** 0.5])
    for backend in BACKENDS:
        z = fs.ensemble_scores(scores[:1], method="zscore", backend=backend)
        torch.testing.assert_close(z, expected, atol=1e-6, rtol=1e-6, msg=backend)
        z = fs.ensemble_scores(scores[1:], method="zscore", backend=backend)
        assert z.tolist() == [1.0, -1.0, INF], backend


# -- item 5: empty input ----------------------------------------------------------------------------------

NO_GROUPS = {  # G = 0: an empty result of the full shape on every backend
    "topk_dense": (lambda b: fs.segmented_topk(EMPTY(0, 3), 2, backend=b), [(0, 2), (0, 2)]),
    "topk_ragged": (lambda b: fs.segmented_topk(EMPTY(0), 2, offsets=torch.tensor([0]), backend=b), [(0, 2), (0, 2)]),
    "beam_dense": (lambda b: fs.beam_prune(EMPTY(0, 0), 2, refill_to=3, backend=b), [(0, 2), (0, 2), (0,), (0, 3)]),
    "resample_dense": (lambda b: fs.resample(EMPTY(0, 3), 4, seed=0, backend=b), [(0, 4)]),
    "resample_no_columns": (lambda b: fs.resample(EMPTY(0, 0), 4, seed=0, backend=b), [(0, 4)]),
    "resample_ragged": (lambda b: fs.resample(EMPTY(0), 4, offsets=torch.tensor([0]), seed=0, backend=b), [(0, 4)]),
    "ess_ragged": (lambda b: fs.effective_sample_size(EMPTY(0), offsets=torch.tensor([0]), backend=b), [(0,)]),
    "vote_dense": (lambda b: fs.vote(EMPTY(0, 3, dtype=torch.int64), backend=b), [(0,)]),
    "keys_dense": (lambda b: fs.sequence_keys(EMPTY(0, 3, dtype=torch.int64), backend=b), [(0,)]),
    "aggregate_ragged": (lambda b: fs.aggregate_steps(EMPTY(0), offsets=torch.tensor([0]), backend=b), [(0,)]),
    "cosine_groups": (lambda b: fs.cosine_scores(EMPTY(0, 3), EMPTY(0, 3), offsets=torch.tensor([0]), backend=b),
                      [(0,)]),
    "ensemble_groups": (lambda b: fs.ensemble_scores(EMPTY(2, 0), offsets=torch.tensor([0]), backend=b), [(0,)]),
}


@pytest.mark.parametrize("case", sorted(NO_GROUPS))
def test_no_groups_give_empty_results(case):
    call, shapes = NO_GROUPS[case]
    result = assert_all_agree(call)
    result = tuple(result) if isinstance(result, tuple) else (result,)
    assert [tuple(part.shape) for part in result if part is not None] == shapes


EMPTY_GROUPS = {  # a group of size 0 among others: padding / -1 / 0, the same on every backend
    "topk": (lambda b: fs.segmented_topk(torch.tensor([1., 2.]), 2, offsets=torch.tensor([0, 0, 2]), backend=b),
             [[-1, -1], [1, 0]]),
    "beam": (lambda b: fs.beam_prune(EMPTY(2, 0), 1, refill_to=2, backend=b).parents, [[-1, -1], [-1, -1]]),
    "ess": (lambda b: fs.effective_sample_size(torch.tensor([1.]), offsets=torch.tensor([0, 0, 1]), backend=b),
            [0.0, 1.0]),
    "vote": (lambda b: fs.vote(torch.tensor([4]), offsets=torch.tensor([0, 1, 1]), backend=b), [0, -1]),
    "keys": (lambda b: fs.sequence_keys(EMPTY(2, 0, dtype=torch.int64), backend=b), [0, 0]),
}


@pytest.mark.parametrize("case", sorted(EMPTY_GROUPS))
def test_empty_groups(case):
    call, expected = EMPTY_GROUPS[case]
    result = assert_all_agree(call)
    result = result.indices if isinstance(result, tuple) else result
    assert result.tolist() == expected


@pytest.mark.parametrize("log_weights, offsets", [(EMPTY(0), None), (EMPTY(2, 0), None),
                                                  (torch.tensor([1.]), torch.tensor([0, 1, 1]))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resample_from_an_empty_group_is_a_value_error(log_weights, offsets, backend):
    with pytest.raises(ValueError, match="log_weights: group .* has no candidate with finite log-weight"):
        fs.resample(log_weights, 2, offsets=offsets, seed=0, backend=backend)


# -- item 6: clear errors for bad arguments, the same on every backend -------------------------------------

_S = torch.arange(6.).view(2, 3)
_K = torch.zeros(2, 3, dtype=torch.int64)
HOSTILE = [  # (name, call, error type, words the message must hold)
    ("topk k str", lambda b: fs.segmented_topk(_S, "2", backend=b), TypeError, "k must be an int"),
    ("topk k 0", lambda b: fs.segmented_topk(_S, 0, backend=b), ValueError, "k must be at least 1"),
    ("topk scores None", lambda b: fs.segmented_topk(None, 2, backend=b), TypeError, "scores must be a tensor"),
    ("topk scores int", lambda b: fs.segmented_topk(_K, 2, backend=b), TypeError, "scores must be"),
    ("topk offsets list", lambda b: fs.segmented_topk(_S[0], 2, offsets=[0, 3], backend=b), TypeError, "offsets"),
    ("topk offsets int32", lambda b: fs.segmented_topk(_S[0], 2, offsets=torch.tensor([0, 3], dtype=torch.int32),
                                                       backend=b), TypeError, "offsets must be an int64"),
    ("topk mask list", lambda b: fs.segmented_topk(_S, 2, mask=[[True] * 3] * 2, backend=b), TypeError, "mask"),
    ("topk mask shape", lambda b: fs.segmented_topk(_S, 2, mask=torch.ones(3, 2, dtype=torch.bool), backend=b),
     ValueError, "mask has shape"),
    ("topk largest str", lambda b: fs.segmented_topk(_S, 2, largest="no", backend=b), TypeError, "largest"),
    ("topk 3d", lambda b: fs.segmented_topk(torch.zeros(2, 2, 2), 2, backend=b), ValueError, "scores must be"),
    ("beam penalty str", lambda b: fs.beam_prune(_S, 1, length_penalty="0.5", backend=b), TypeError,
     "length_penalty must be a float"),
    ("beam penalty None", lambda b: fs.beam_prune(_S, 1, length_penalty=None, backend=b), TypeError,
     "length_penalty"),
    ("beam refill str", lambda b: fs.beam_prune(_S, 1, refill_to="3", backend=b), TypeError, "refill_to"),
    ("beam refill neg", lambda b: fs.beam_prune(_S, 1, refill_to=-1, backend=b), ValueError, "refill_to"),
    ("beam finished list", lambda b: fs.beam_prune(_S, 1, finished=[[False] * 3] * 2, backend=b), TypeError,
     "finished"),
    ("beam lengths bool", lambda b: fs.beam_prune(_S, 1, lengths=torch.ones(2, 3, dtype=torch.bool), backend=b),
     TypeError, "lengths must be numeric"),
    ("beam keys float", lambda b: fs.beam_prune(_S, 1, dedup_keys=_S, backend=b), TypeError, "dedup_keys"),
    ("resample n str", lambda b: fs.resample(_S, "2", seed=0, backend=b), TypeError, "num_samples"),
    ("resample seed None", lambda b: fs.resample(_S, 2, seed=None, backend=b), TypeError, "seed"),
    ("resample method", lambda b: fs.resample(_S, 2, seed=0, method="best", backend=b), ValueError, "method"),
    ("resample offsets list", lambda b: fs.resample(_S[0], 2, offsets=[0, 3], seed=0, backend=b), TypeError,
     "offsets"),
    ("ess offsets tuple", lambda b: fs.effective_sample_size(_S[0], offsets=(0, 3), backend=b), TypeError, "offsets"),
    ("ess None", lambda b: fs.effective_sample_size(None, backend=b), TypeError, "log_weights"),
    ("vote keys float", lambda b: fs.vote(_S, backend=b), TypeError, "answer_keys"),
    ("vote scores list", lambda b: fs.vote(_K, [[1.0] * 3] * 2, method="max", backend=b), TypeError, "scores"),
    ("vote weighted no scores", lambda b: fs.vote(_K, method="weighted", backend=b), ValueError, "need scores"),
    ("vote method int", lambda b: fs.vote(_K, method=1, backend=b), ValueError, "method"),
    ("keys float", lambda b: fs.sequence_keys(_S, backend=b), TypeError, "token_ids"),
    ("keys offsets list", lambda b: fs.sequence_keys(_K[0], offsets=[0, 3], backend=b), TypeError, "offsets"),
    ("keys 3d", lambda b: fs.sequence_keys(torch.zeros(2, 2, 2, dtype=torch.int64), backend=b), ValueError,
     "token_ids must be"),
    ("prm head None", lambda b: fs.prm_scores(_HIDDEN, torch.tensor([0]), None, backend=b), TypeError,
     "head_weight must be a tensor"),
    ("prm step head None", lambda b: fs.prm_step_scores(_HIDDEN, torch.tensor([0]), None, backend=b), TypeError,
     "head_weight must be a tensor"),
    ("prm positions None", lambda b: fs.prm_step_scores(_HIDDEN, None, _HEAD, backend=b), TypeError,
     "step_positions must be a tensor"),
    ("prm bias list", lambda b: fs.prm_step_scores(_HIDDEN, torch.tensor([0]), _HEAD, head_bias=[0., 1.],
                                                   backend=b), TypeError, "head_bias"),
    ("prm offsets list", lambda b: fs.prm_scores(_HIDDEN, torch.tensor([0]), _HEAD, offsets=[0, 1], backend=b),
     TypeError, "offsets"),
    ("aggregate offsets list", lambda b: fs.aggregate_steps(_S[0], offsets=[0, 3], backend=b), TypeError, "offsets"),
    ("cosine refs None", lambda b: fs.cosine_scores(_EMB, None, backend=b), TypeError, "references"),
    ("cosine offsets list", lambda b: fs.cosine_scores(_EMB, _REFS, offsets=[0, 2, 5], backend=b), TypeError,
     "offsets"),
    ("ensemble weights str", lambda b: fs.ensemble_scores(_S, weights="ab", backend=b), TypeError, "weights"),
    ("ensemble offsets list", lambda b: fs.ensemble_scores(_S, offsets=[0, 3], backend=b), TypeError, "offsets"),
]


@pytest.mark.parametrize("name, call, error, words", HOSTILE, ids=[case[0] for case in HOSTILE])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_arguments_get_named_errors(name, call, error, words, backend):
    with pytest.raises(error, match=words):
        call(backend)


HUGE = [  # sizes whose output torch cannot even size: a ValueError naming the argument, not an allocator error
    ("k", lambda b, n: fs.segmented_topk(_S, n, backend=b)),
    ("k", lambda b, n: fs.beam_prune(_S, n, backend=b)),
    ("refill_to", lambda b, n: fs.beam_prune(_S, 1, refill_to=n, backend=b)),
    ("num_samples", lambda b, n: fs.resample(_S, n, seed=0, backend=b)),
    ("num_samples", lambda b, n: fs.resample(_S[0], n, offsets=torch.tensor([0, 1, 3]), seed=0, backend=b)),
]


@pytest.mark.parametrize("size", [2**62, 2**64])
@pytest.mark.parametrize("name, call", HUGE, ids=[f"{case[0]}-{i}" for i, case in enumerate(HUGE)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_past_int64_are_named(name, call, size, backend):
    with pytest.raises(ValueError, match=f"{name}={size} is too large"):
        call(backend, size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_log_weights_are_read_as_fp32(backend):
    """1e300 is finite in float64 but +inf in fp32, where every kernel reads it: an error, and a NaN ESS."""
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        fs.resample(torch.tensor([[1e300, 0.]], dtype=torch.float64), 3, seed=0, backend=backend)
    ess = fs.effective_sample_size(torch.tensor([[1e300, 0.], [-1e300, 0.]], dtype=torch.float64), backend=backend)
    assert ess[0].isnan() and ess[1] == 1.0


def test_aggregate_steps_offsets_on_another_device_is_named():
    """The Python check named an undefined variable (NameError) instead of the offsets' device."""
    offsets = torch.tensor([0, 3, 4], device="meta")
    for backend in ("torch", "triton") if "triton" in BACKENDS else ("torch",):
        with pytest.raises(ValueError, match="offsets"):
            fs.aggregate_steps(torch.ones(4), offsets=offsets, backend=backend)
