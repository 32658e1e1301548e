"""Property-based differential tests of the step and noise ops (see tests/test_properties.py for the scheme).

Generated samples hold ties, NaN and +-inf, come contiguous, strided or transposed, with per-sample schedules
that may be strided views; every kernel backend must give the reference's result (to rounding, NaN and inf in
the same elements: csrc/README.md, "NaN and inf") or raise the same kind of error.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from test_properties import agree  # also loads the hypothesis profile

import fastsearch

STEP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def samples(draw, *, specials=True):
    """A [B, C, W] sample (maybe a transposed or strided view) with a few levels, NaN and +-inf."""
    batch, channels, width = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(STEP_DTYPES))
    pool = [float(v) / 4 for v in draw(st.lists(st.integers(-8, 8), min_size=1, max_size=4))]
    if specials:
        pool += draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=2))
    numel = batch * channels * width
    flat = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=numel, max_size=numel)), dtype=torch.float32)
    x = flat.reshape(batch, channels, width).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        wide = torch.zeros(batch, channels, 2 * width, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


@st.composite
def levels(draw, batch, low, high):
    """A float in [low, high], or a [B] (maybe strided) tensor of them."""
    if draw(st.booleans()):
        return draw(st.floats(low, high, allow_nan=False))
    values = torch.tensor(draw(st.lists(st.floats(low, high, allow_nan=False), min_size=batch, max_size=batch)),
                          dtype=torch.float32)
    if draw(st.booleans()):
        wide = torch.zeros(2 * batch)
        wide[::2] = values
        values = wide[::2]
    return values


def _same_step(got, want, what):
    """To rounding (fp16 / bf16: torch's tolerances for the dtype), NaN in exactly the reference's elements."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN in other elements than the reference's"
    torch.testing.assert_close(got, want, equal_nan=True,
                               **({"rtol": 1e-5, "atol": 1e-5} if got.dtype == torch.float32 else {}))


def _agree(call, backend):
    agree(call, backend, same=_same_step)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), eta=st.sampled_from([0.0, 0.5, 1.0]), prediction=st.sampled_from(
    ["epsilon", "sample", "v_prediction"]), clip=st.sampled_from([None, 1.0]), use_clipped=st.booleans())
def test_ddim_step(device, backend, data, eta, prediction, clip, use_clipped):
    x = data.draw(samples())
    m = data.draw(samples()).to(x.dtype)
    if m.shape != x.shape:
        m = torch.zeros_like(x)
    alpha = data.draw(levels(x.shape[0], 0.05, 0.95))
    alpha_prev = data.draw(levels(x.shape[0], 0.05, 0.99))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype) if eta else None
    _agree(lambda b: fastsearch.ddim_step(x, m, alpha, alpha_prev, eta=eta, noise=noise, prediction_type=prediction,
                                          clip_sample_range=clip, use_clipped_model_output=use_clipped, backend=b),
           backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), stochastic=st.booleans())
def test_flow_steps(device, backend, data, stochastic):
    x = data.draw(samples())
    v = data.draw(samples())
    if v.shape != x.shape or v.dtype != x.dtype:
        v = x.flip(0)
    sigma = data.draw(levels(x.shape[0], 0.0, 1.0))
    sigma_next = data.draw(levels(x.shape[0], 0.0, 1.0))
    _agree(lambda b: fastsearch.flow_euler_step(x, v, sigma, sigma_next, seed=3 if stochastic else None,
                                                stochastic=stochastic, backend=b), backend)
    _agree(lambda b: fastsearch.flow_heun_step(x, v, x, sigma, sigma_next, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(data=st.data(), schedule=st.sampled_from(["vp", "flow"]), seed=st.integers(0, 2**40))
def test_renoise(device, backend, data, schedule, seed):
    x = data.draw(samples())
    start = data.draw(st.floats(0.01, 0.99, allow_nan=False))
    end = data.draw(st.sampled_from([start, start * 0.5, min(start * 1.5, 1.0)]))
    if schedule == "vp":
        start, end = max(start, end), min(start, end)
    else:
        start, end = min(start, end), max(start, end)
    _agree(lambda b: fastsearch.renoise(x, start, end, schedule=schedule, seed=seed, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@given(shape=st.lists(st.integers(0, 7), max_size=3), seed=st.integers(0, 2**62),
       offset=st.one_of(st.integers(0, 2**20), st.integers(2**63 - 400, 2**63)),
       dtype=st.sampled_from(STEP_DTYPES))
def test_randn(device, backend, shape, seed, offset, dtype):
    _agree(lambda b: fastsearch.randn(tuple(shape), seed=seed, offset=offset, dtype=dtype, backend=b), backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_schedule_scalars_are_fp32_on_every_backend(device, backend):
    """Found by the fuzz profile: the Triton launcher passed a float schedule value unrounded, so the interpreter
    computed (0 - 2.8e-59) * inf = -inf where every other backend rounds 2.8e-59 to 0 in fp32 and gets NaN."""
    x = torch.zeros(2, 3)
    v = torch.zeros(2, 3)
    v[0, 2] = float("inf")
    want = fastsearch.flow_euler_step(x, v, 2.819209907139981e-59, 0.0, backend="torch")
    got = fastsearch.flow_euler_step(x, v, 2.819209907139981e-59, 0.0, backend=backend)
    assert want[0, 2].isnan() and torch.equal(got.isnan(), want.isnan())
