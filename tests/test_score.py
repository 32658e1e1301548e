"""Scoring ops: the references against full-logits and plain-Python definitions, every backend against the
references (odd H, S = 0, empty and one-step candidates, bf16 hidden states), and bad input. (The PRM head of
a transformers model end to end is in test_integrations_transformers.py, beside ``lm_head_rows``.)"""

import math

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_matches_reference

import fastsearch
from fastsearch import _backend

NAN, INF = float("nan"), float("inf")
METHODS = ["last", "min", "prod", "mean", "max", "logit_sum"]


def _offsets(sizes, device="cpu"):
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return torch.tensor(out, dtype=torch.int64, device=device)


def _prm_inputs(tokens, hidden, steps, rows, dtype, device, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
    positions = torch.randint(0, tokens, (steps,), generator=g).to(device)
    weight = (torch.randn(rows, hidden, generator=g) / math.sqrt(hidden) * 3).to(dtype).to(device)
    head_bias = torch.randn(rows, generator=g).to(dtype).to(device) if bias else None
    return hidden_states, positions, weight, head_bias


def _full_logits_scores(hidden_states, positions, weight, bias, positive_index, activation):
    """What today's PRM code does: every logit of every token, then two columns at the step tags."""
    logits = hidden_states.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits[positions]
    if activation == "softmax":
        return torch.softmax(logits, -1)[:, positive_index].float()
    return torch.sigmoid(logits[:, positive_index]).float()


# -- references against their definitions -------------------------------------------------------------


@pytest.mark.parametrize("rows,activation,positive_index", [(2, "softmax", 0), (2, "softmax", 1), (5, "softmax", 3),
                                                            (1, "sigmoid", 0), (3, "sigmoid", 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_equals_full_logits(rows, activation, positive_index, bias):
    hidden_states, positions, weight, head_bias = _prm_inputs(37, 19, 11, rows, torch.float32, "cpu", bias=bias)
    out = fastsearch.prm_step_scores(hidden_states, positions, weight, head_bias=head_bias,
                                     positive_index=positive_index, activation=activation, backend="torch")
    expected = _full_logits_scores(hidden_states, positions, weight, head_bias, positive_index, activation)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def _plain_aggregate(values, method):
    if method == "last":
        return values[-1]
    if any(math.isnan(v) for v in values):
        return NAN
    if method == "min":
        return min(values)
    if method == "max":
        return max(values)
    if method == "prod":
        return math.prod(values)
    if method == "mean":
        return sum(values) / len(values)
    clip = float(torch.tensor(1e-7, dtype=torch.float32))
    high = float(torch.tensor(1 - 1e-7, dtype=torch.float32))
    return sum(math.log(min(max(v, clip), high)) - math.log1p(-min(max(v, clip), high)) for v in values)


@pytest.mark.parametrize("method", METHODS)
def test_reference_aggregate_is_plain_definition(method):
    sizes = [3, 0, 1, 5, 2, 0, 4]
    g = torch.Generator().manual_seed(3)
    steps = torch.rand(sum(sizes), generator=g)
    steps[7] = NAN
    steps[2] = 0.0
    steps[3] = 1.0
    out = fastsearch.aggregate_steps(steps, offsets=_offsets(sizes), method=method, empty=-2.5, backend="torch")
    start = 0
    for n, size in enumerate(sizes):
        values = steps[start:start + size].tolist()
        expected = -2.5 if size == 0 else _plain_aggregate(values, method)
        if math.isnan(expected):
            assert math.isnan(out[n].item()), (n, method)
        else:
            assert out[n].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (n, method)
        start += size


def _plain_ranks(values):
    def below(a, b):  # b below a
        return (math.isnan(b) and not math.isnan(a)) or (not math.isnan(a) and not math.isnan(b) and b < a)

    def same(a, b):
        return (math.isnan(a) and math.isnan(b)) or a == b

    return [1 + sum(below(a, b) for b in values) + (sum(same(a, b) for b in values) - 1) / 2 for a in values]


def _plain_zscores(values):
    finite = [v for v in values if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else 0.0
    out = []
    for v in values:
        if math.isnan(v) or v == -INF:
            out.append(-INF)
        elif v == INF:
            out.append(INF)
        else:
            out.append((v - mean) / std if std > 0 else 0.0)
    return out


@pytest.mark.parametrize("method", ["rank", "zscore"])
def test_reference_ensemble_is_plain_definition(method):
    sizes = [4, 0, 1, 6, 3]
    scores = torch.tensor([[1, 2, 2, NAN, 5, 3, 3, 3, -1, 0, 9, 2, 2, 2],
                           [0, 0, 0, 0, 1, 2, NAN, NAN, 4, 4, -INF, 1, 7, 1],
                           [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]], dtype=torch.float32)
    weights = [0.5, 2.0, 0.0]
    out = fastsearch.ensemble_scores(scores, offsets=_offsets(sizes), method=method, weights=weights, backend="torch")
    plain = _plain_ranks if method == "rank" else _plain_zscores
    start = 0
    for size in sizes:
        per_verifier = [plain(scores[v, start:start + size].tolist()) for v in range(2)]
        for j in range(size):
            expected = (0.5 * per_verifier[0][j] + 2.0 * per_verifier[1][j]) / 2.5
            assert out[start + j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        start += size


@pytest.mark.parametrize("layout", ["one", "pairwise", "groups"])
def test_reference_cosine_is_normalise_and_dot(layout):
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(9, 13, generator=g)
    embeddings[4] = 0.0
    sizes = [2, 0, 4, 3]
    references = {"one": torch.randn(13, generator=g), "pairwise": torch.randn(9, 13, generator=g),
                  "groups": torch.randn(4, 13, generator=g)}[layout]
    offsets = _offsets(sizes) if layout == "groups" else None
    out = fastsearch.cosine_scores(embeddings, references, offsets=offsets, backend="torch")
    if layout == "groups":
        references = references[torch.tensor([0, 0, 2, 2, 2, 2, 3, 3, 3])]
    expected = (torch.nn.functional.normalize(embeddings, dim=-1) * torch.nn.functional.normalize(references, dim=-1)
                ).sum(-1)
    torch.testing.assert_close(out, expected)


# -- every backend against the reference -----------------------------------------------------------------

PRM_SHAPES = [  # tokens, hidden, steps, rows
    (1, 1, 1, 2), (17, 7, 5, 2), (64, 333, 0, 2), (50, 1025, 33, 2), (9, 64, 70, 8), (300, 96, 129, 3)]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,steps,rows", PRM_SHAPES)
def test_prm_step_scores_backends(device, backend, dtype, tokens, hidden, steps, rows):
    for activation, positive_index, bias in [("softmax", rows - 1, False), ("sigmoid", 0, True)]:
        hidden_states, positions, weight, head_bias = _prm_inputs(tokens, hidden, steps, rows, dtype, device,
                                                                  seed=tokens + hidden, bias=bias)
        kwargs = dict(head_bias=head_bias, positive_index=positive_index, activation=activation)
        out = fastsearch.prm_step_scores(hidden_states, positions, weight, backend=backend, **kwargs)
        ref = fastsearch.prm_step_scores(hidden_states, positions, weight, backend="torch", **kwargs)
        assert out.dtype == torch.float32 and out.shape == (steps,)
        # fp32 math on the same (rounded) inputs: only the summation order differs
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def _ragged_steps(sizes, dtype, device, seed, nan=True):
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(sum(sizes), generator=g)
    if nan and steps.numel() > 3:
        steps[2] = NAN
        steps[-1] = 0.0
        steps[0] = 1.0
    return steps.to(dtype).to(device)


AGGREGATE_SIZES = [[], [1], [0, 0], [3, 0, 1, 7, 2], [1] * 13, [40, 1, 0, 255, 3]]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sizes", AGGREGATE_SIZES, ids=lambda sizes: f"n{len(sizes)}s{sum(sizes)}")
def test_aggregate_steps_backends(device, backend, method, sizes):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        steps = _ragged_steps(sizes, dtype, device, seed=len(sizes))
        offsets = _offsets(sizes, device)
        out = fastsearch.aggregate_steps(steps, offsets=offsets, method=method, empty=-3.0, backend=backend)
        ref = fastsearch.aggregate_steps(steps, offsets=offsets, method=method, empty=-3.0, backend="torch")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_aggregate_steps_dense(device, backend, method):
    steps = _ragged_steps([5] * 7, torch.float32, device, seed=5).view(7, 5)
    out = fastsearch.aggregate_steps(steps, method=method, backend=backend)
    ragged = fastsearch.aggregate_steps(steps.reshape(-1), offsets=_offsets([5] * 7, device), method=method,
                                        backend="torch")
    torch.testing.assert_close(out, ragged, equal_nan=True)
    empty = fastsearch.aggregate_steps(steps[:, :0], method=method, empty=0.25, backend=backend)
    torch.testing.assert_close(empty, torch.full((7,), 0.25, device=device))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,hidden", [([], 8), ([1], 1), ([3, 0, 1, 7, 2], 333), ([1] * 21, 64),
                                          ([64, 2, 0, 5], 1025)], ids=lambda v: str(v)[:12])
def test_prm_scores_backends(device, backend, dtype, sizes, hidden):
    steps = sum(sizes)
    hidden_states, positions, weight, head_bias = _prm_inputs(2 * steps + 3, hidden, steps, 2, dtype, device,
                                                              seed=hidden, bias=True)
    offsets = _offsets(sizes, device)
    for method in METHODS:
        kwargs = dict(head_bias=head_bias, positive_index=1, method=method, empty=-1.0)
        scores, step_scores = fastsearch.prm_scores(hidden_states, positions, weight, offsets=offsets,
                                                    backend=backend, **kwargs)
        ref_scores, ref_steps = fastsearch.prm_scores(hidden_states, positions, weight, offsets=offsets,
                                                      backend="torch", **kwargs)
        torch.testing.assert_close(step_scores, ref_steps, atol=2e-6, rtol=1e-5)
        # logit_sum and prod amplify the step scores' last-bit differences
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)


def test_prm_scores_is_step_scores_then_aggregate():
    sizes = [3, 0, 4, 1]
    hidden_states, positions, weight, _ = _prm_inputs(30, 17, 8, 2, torch.float32, "cpu")
    for method in METHODS:
        scores, steps = fastsearch.prm_scores(hidden_states, positions, weight, offsets=_offsets(sizes), method=method,
                                              empty=0.5)
        torch.testing.assert_close(steps, fastsearch.prm_step_scores(hidden_states, positions, weight))
        torch.testing.assert_close(scores, fastsearch.aggregate_steps(steps, offsets=_offsets(sizes), method=method,
                                                                      empty=0.5))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["one", "pairwise", "groups"])
@pytest.mark.parametrize("num,dim", [(0, 5), (4, 0), (1, 1), (9, 13), (67, 1025)])
def test_cosine_scores_backends(device, backend, dtype, layout, num, dim):
    g = torch.Generator().manual_seed(num + dim)
    embeddings = torch.randn(num, dim, generator=g)
    if num > 2:
        embeddings[1] = 0.0
    sizes = [num // 3, 0, num - num // 3] if layout == "groups" else None
    references = {"one": torch.randn(dim, generator=g), "pairwise": torch.randn(num, dim, generator=g),
                  "groups": torch.randn(3, dim, generator=g)}[layout]
    offsets = None if sizes is None else _offsets(sizes, device)
    embeddings, references = embeddings.to(dtype).to(device), references.to(dtype).to(device)
    out = fastsearch.cosine_scores(embeddings, references, offsets=offsets, backend=backend)
    ref = fastsearch.cosine_scores(embeddings, references, offsets=offsets, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _ensemble_inputs(verifiers, sizes, device, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (verifiers, sum(sizes)), generator=g).float() / 2  # ties
    if scores.numel() > 6:
        scores.view(-1)[3] = NAN
        scores.view(-1)[5] = -INF
        scores.view(-1)[-2] = NAN
    return scores.to(dtype).to(device)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["rank", "zscore"])
@pytest.mark.parametrize("verifiers,sizes", [(1, [1]), (3, [4, 0, 1, 6, 2]), (2, [0]), (4, [130, 7]), (2, [])],
                         ids=lambda v: str(v)[:10])
def test_ensemble_scores_backends(device, backend, method, verifiers, sizes):
    for dtype in (torch.float32, torch.float16, torch.float64):
        scores = _ensemble_inputs(verifiers, sizes, device, seed=verifiers, dtype=dtype)
        weights = torch.arange(1, verifiers + 1, dtype=torch.float32, device=device)
        if verifiers > 2:
            weights[1] = 0.0
        offsets = _offsets(sizes, device)
        for w in (None, weights):
            out = fastsearch.ensemble_scores(scores, offsets=offsets, method=method, weights=w, backend=backend)
            ref = fastsearch.ensemble_scores(scores, offsets=offsets, method=method, weights=w, backend="torch")
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
        if sizes:
            whole = fastsearch.ensemble_scores(scores, method=method, backend=backend)
            torch.testing.assert_close(whole, fastsearch.ensemble_scores(scores, method=method, backend="torch"),
                                       equal_nan=True)
    # equal scores that fp32 cannot sum exactly: z must be exactly 0, ranks all equal
    same = torch.full((verifiers, sum(sizes)), 0.1, device=device)
    out = fastsearch.ensemble_scores(same, offsets=_offsets(sizes, device), method=method, backend=backend)
    torch.testing.assert_close(out, fastsearch.ensemble_scores(same, offsets=_offsets(sizes, device), method=method,
                                                               backend="torch"))
    if method == "zscore":
        assert bool((out == 0).all())


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_prm_errors(device, backend):
    hidden_states, positions, weight, _ = _prm_inputs(10, 8, 4, 2, torch.float32, device)

    def call(**changes):
        args = dict(hidden_states=hidden_states, step_positions=positions, head_weight=weight)
        args.update(changes)
        return fastsearch.prm_step_scores(args.pop("hidden_states"), args.pop("step_positions"),
                                          args.pop("head_weight"), backend=backend, **args)

    with pytest.raises(ValueError, match=r"step_positions must index hidden_states rows in \[0, T=10\), got 10"):
        call(step_positions=torch.tensor([0, 10], device=device))
    with pytest.raises(ValueError, match=r"got -1"):
        call(step_positions=torch.tensor([-1, 3], device=device))
    with pytest.raises(ValueError, match=r"head_weight must be \[C, H=8\]"):
        call(head_weight=torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        call(head_weight=torch.randn(9, 8, device=device))
    with pytest.raises(TypeError, match="head_weight has dtype torch.float16"):
        call(head_weight=weight.half())
    with pytest.raises(TypeError, match="step_positions must be an int64 tensor"):
        call(step_positions=positions.int())
    with pytest.raises(ValueError, match="positive_index must be in"):
        call(positive_index=2)
    with pytest.raises(ValueError, match="at least 2 head rows"):
        call(head_weight=weight[:1])
    with pytest.raises(ValueError, match=r"head_bias must be \[C=2\]"):
        call(head_bias=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="activation must be one of"):
        call(activation="tanh")
    with pytest.raises(TypeError, match="hidden_states must be float32"):
        call(hidden_states=hidden_states.double(), head_weight=weight.double())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_step_offset_errors(device, backend):
    hidden_states, positions, weight, _ = _prm_inputs(10, 8, 4, 2, torch.float32, device)
    steps = torch.rand(4, device=device)
    with pytest.raises(ValueError, match=r"offsets must start at 0 and end at S=4, got 0 ... 5"):
        fastsearch.prm_scores(hidden_states, positions, weight, offsets=_offsets([2, 3], device), backend=backend)
    with pytest.raises(ValueError, match=r"end at S=4"):
        fastsearch.aggregate_steps(steps, offsets=_offsets([1, 1], device), backend=backend)
    with pytest.raises(ValueError, match="non-decreasing"):
        fastsearch.aggregate_steps(steps, offsets=torch.tensor([0, 3, 2, 4], device=device), backend=backend)
    with pytest.raises(ValueError, match="candidate 1 has no steps; pass empty="):
        fastsearch.prm_scores(hidden_states, positions, weight, offsets=_offsets([2, 0, 2], device), backend=backend)
    with pytest.raises(ValueError, match="candidate 2 has no steps"):
        fastsearch.aggregate_steps(steps, offsets=_offsets([2, 2, 0], device), method="mean", backend=backend)
    with pytest.raises(ValueError, match="method must be one of"):
        fastsearch.aggregate_steps(steps, offsets=_offsets([4], device), method="median", backend=backend)
    with pytest.raises(TypeError, match="offsets must be an int64 tensor"):
        fastsearch.aggregate_steps(steps, offsets=_offsets([4], device).int(), backend=backend)
    with pytest.raises(ValueError, match=r"step_scores must be \[N, K\]"):
        fastsearch.aggregate_steps(steps.view(2, 1, 2), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_cosine_and_ensemble_errors(device, backend):
    embeddings = torch.randn(5, 4, device=device)
    with pytest.raises(ValueError, match=r"references must be \[D=4\]"):
        fastsearch.cosine_scores(embeddings, torch.randn(3, device=device), backend=backend)
    with pytest.raises(ValueError, match="pass offsets"):
        fastsearch.cosine_scores(embeddings, torch.randn(2, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match="offsets describe 3 groups but references has 2 rows"):
        fastsearch.cosine_scores(embeddings, torch.randn(2, 4, device=device), offsets=_offsets([1, 2, 2], device),
                                 backend=backend)
    with pytest.raises(TypeError, match="references has dtype"):
        fastsearch.cosine_scores(embeddings, torch.randn(4, device=device).half(), backend=backend)
    scores = torch.randn(2, 5, device=device)
    with pytest.raises(ValueError, match=r"weights must be \[V=2\]"):
        fastsearch.ensemble_scores(scores, weights=[1.0, 2.0, 3.0], backend=backend)
    with pytest.raises(ValueError, match="method must be one of"):
        fastsearch.ensemble_scores(scores, method="borda", backend=backend)
    if device == "cpu":  # group offsets are value-checked where they live on the CPU (no device sync)
        with pytest.raises(ValueError, match="offsets must start at 0 and end at T=5"):
            fastsearch.ensemble_scores(scores, offsets=_offsets([2, 2], device), backend=backend)
        with pytest.raises(ValueError, match="weights must be finite, non-negative and not all zero"):
            fastsearch.ensemble_scores(scores, weights=[0.0, 0.0], backend=backend)
        with pytest.raises(ValueError, match="weights must be finite"):
            fastsearch.ensemble_scores(scores, weights=[1.0, -1.0], backend=backend)


# -- torch.library integration ---------------------------------------------------------------------------


def _score_op_cases(device):
    hidden_states, positions, weight, bias = _prm_inputs(12, 9, 5, 2, torch.float32, device, bias=True)
    offsets = _offsets([2, 0, 3], device)
    return {
        "prm_step_scores": [(hidden_states, positions, weight, bias, 1, 0), (hidden_states, positions, weight[:1],
                                                                             None, 0, 1)],
        "aggregate_steps": [(torch.rand(5, device=device), offsets, 3, 0.5),
                            (torch.rand(3, 4, device=device), None, 5, None)],
        "prm_scores": [(hidden_states, positions, offsets, weight, bias, 0, 0, 1, -1.0)],
        "cosine_scores": [(hidden_states[:5], hidden_states[7], None),
                          (hidden_states[:5], hidden_states[5:8], offsets)],
        "ensemble_scores": [(torch.randn(3, 5, device=device), offsets, 0, None),
                            (torch.randn(2, 5, device=device), None, 1, torch.tensor([1.0, 2.0], device=device))],
    }


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["prm_step_scores", "aggregate_steps", "prm_scores", "cosine_scores",
                                  "ensemble_scores"])
def test_opcheck(device, backend, name):
    op = getattr(torch.ops.fastsearch, name if backend in ("cpu", "cuda") else name + "_triton").default
    for args in _score_op_cases(device)[name]:
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not _backend._has_kernel("prm_scores", "CPU"), reason="compiled CPU kernels not built")
def test_compile_fullgraph_prm_scores():
    hidden_states, positions, weight, _ = _prm_inputs(12, 9, 5, 2, torch.float32, "cpu")
    offsets = _offsets([2, 3])

    def score(hidden):
        candidate, steps = fastsearch.prm_scores(hidden, positions, weight, offsets=offsets, method="mean")
        return candidate * 2, steps

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(hidden_states), score(hidden_states), strict=True):
        torch.testing.assert_close(got, expected)


def test_bf16_hidden_states_stay_close_to_fp32():
    """bf16 hidden states and head rows: the error against fp32 inputs is that of rounding the inputs."""
    hidden_states, positions, weight, _ = _prm_inputs(40, 257, 31, 2, torch.float32, "cpu")
    exact = fastsearch.prm_step_scores(hidden_states, positions, weight, backend="torch")
    low = fastsearch.prm_step_scores(hidden_states.bfloat16(), positions, weight.bfloat16())
    rounded = fastsearch.prm_step_scores(hidden_states.bfloat16(), positions, weight.bfloat16(), backend="torch")
    assert_matches_reference(low, rounded)
    assert (low - exact).abs().max() < 0.05
