"""Property-based differential tests: every backend that runs here against the reference, on generated input.

Hypothesis draws ragged groups (empty ones included), dtypes, values with ties, NaN and +-inf, and layouts
(contiguous, strided views, expanded offsets); each kernel backend must then either return what the reference
returns (indices and integers exactly, floats to rounding, NaN where the reference has NaN) or raise the same
kind of error. The default profile keeps `make test` short; `make fuzz` runs the same tests with the
``fuzz`` profile (HYPOTHESIS_PROFILE=fuzz: many more examples).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import KERNEL_BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsearch

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1500")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPECIAL = [float("nan"), float("inf"), -float("inf")]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def groups(draw, *, min_size=0, max_groups=6, max_size=40):
    """Group sizes and their offsets (int64 [G + 1])."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=0, max_size=max_groups))
    offsets = torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    return sizes, offsets


@st.composite
def values(draw, total, *, specials=True, dtype=None):
    """[total] floats with ties (drawn from a few levels), and NaN / +-inf when `specials`; maybe a strided view."""
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    pool = [float(v) for v in draw(st.lists(st.integers(-6, 6), min_size=1, max_size=5))]
    if specials:
        pool += draw(st.lists(st.sampled_from(SPECIAL), max_size=2))
    picks = draw(st.lists(st.sampled_from(pool), min_size=total, max_size=total))
    flat = torch.tensor(picks, dtype=torch.float64).to(dtype)
    if draw(st.booleans()):  # a strided view of a larger tensor
        wide = torch.zeros(2 * total, dtype=dtype)
        wide[::2] = flat
        flat = wide[::2]
    return flat


def _same(got, want, what):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    if got.dtype.is_floating_point:
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5, equal_nan=True, msg=what)
    else:
        assert torch.equal(got, want), f"{what}: {got.tolist()} != {want.tolist()}"


def agree(call, backend, same=_same):
    """call(backend) must give what call("torch") gives (each output compared by ``same(got, want, what)``), or
    raise the same kind of error."""
    try:
        want = call("torch")
    except (ValueError, TypeError) as error:
        with pytest.raises(type(error)):
            call(backend)
        return
    got = call(backend)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        same(a, b, f"output {index}")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), k=st.integers(1, 6), largest=st.booleans(), masked=st.booleans())
def test_segmented_topk(device, backend, data, k, largest, masked):
    sizes, offsets = data.draw(groups())
    scores = data.draw(values(sum(sizes)))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))),
                        dtype=torch.bool) if masked else None
    agree(lambda b: fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest, backend=b),
           backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), k=st.integers(1, 6), refill_to=st.integers(0, 9),
       options=st.sets(st.sampled_from(["finished", "lengths", "dedup"])))
def test_beam_prune(device, backend, data, k, refill_to, options):
    sizes, offsets = data.draw(groups())
    total = sum(sizes)
    scores = data.draw(values(total))
    finished = (torch.tensor(data.draw(st.lists(st.booleans(), min_size=total, max_size=total)), dtype=torch.bool)
                if "finished" in options else None)
    lengths = (torch.tensor(data.draw(st.lists(st.integers(1, 60), min_size=total, max_size=total)))
               if "lengths" in options else None)
    penalty = data.draw(st.sampled_from([0.0, 0.6, 1.0, 2.0])) if lengths is not None else 1.0
    keys = (torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=total, max_size=total)))
            if "dedup" in options else None)
    agree(lambda b: fastsearch.beam_prune(scores, k, offsets=offsets, finished=finished, lengths=lengths,
                                           length_penalty=penalty, dedup_keys=keys, refill_to=refill_to, backend=b),
           backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_effective_sample_size(device, backend, data):
    sizes, offsets = data.draw(groups())
    log_w = data.draw(values(sum(sizes)))
    agree(lambda b: fastsearch.effective_sample_size(log_w, offsets=offsets, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), num_samples=st.integers(1, 12),
       method=st.sampled_from(["multinomial", "systematic", "stratified", "residual"]), seed=st.integers(0, 2**40))
def test_resample(device, backend, data, num_samples, method, seed):
    sizes, offsets = data.draw(groups(min_size=0))
    log_w = data.draw(values(sum(sizes), dtype=torch.float32))
    agree(lambda b: fastsearch.resample(log_w, num_samples, offsets=offsets, method=method, seed=seed, backend=b),
           backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), method=st.sampled_from(["majority", "weighted", "max"]), masked=st.booleans())
def test_vote(device, backend, data, method, masked):
    sizes, offsets = data.draw(groups())
    total = sum(sizes)
    keys = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=total, max_size=total)), dtype=torch.int64)
    scores = data.draw(values(total))
    mask = (torch.tensor(data.draw(st.lists(st.booleans(), min_size=total, max_size=total)), dtype=torch.bool)
            if masked else None)
    agree(lambda b: fastsearch.vote(keys, scores, offsets=offsets, mask=mask, method=method, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), expanded=st.booleans())
def test_sequence_keys(device, backend, data, expanded):
    sizes, offsets = data.draw(groups(max_size=12))
    total = sum(sizes)
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=total, max_size=total)), dtype=torch.int64)
    if expanded and not sizes:
        offsets = torch.zeros(1, dtype=torch.int64).expand(1)
    elif expanded:  # a strided view of the offsets
        wide = torch.zeros(2 * offsets.numel(), dtype=torch.int64)
        wide[::2] = offsets
        offsets = wide[::2]
    agree(lambda b: fastsearch.sequence_keys(tokens, offsets=offsets, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), method=st.sampled_from(["last", "min", "max", "prod", "mean", "logit_sum"]),
       empty=st.sampled_from([None, 0.0, 0.5]))
def test_aggregate_steps(device, backend, data, method, empty):
    sizes, offsets = data.draw(groups())
    steps = data.draw(values(sum(sizes))).sigmoid()
    agree(lambda b: fastsearch.aggregate_steps(steps, offsets=offsets, method=method, empty=empty, backend=b),
           backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), method=st.sampled_from(["rank", "zscore"]), verifiers=st.integers(1, 3))
def test_ensemble_scores(device, backend, data, method, verifiers):
    sizes, offsets = data.draw(groups())
    total = sum(sizes)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    scores = torch.stack([data.draw(values(total, dtype=dtype)) for _ in range(verifiers)])
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=verifiers, max_size=verifiers))
    agree(lambda b: fastsearch.ensemble_scores(scores, offsets=offsets, method=method, weights=weights, backend=b),
           backend)
