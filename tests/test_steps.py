"""Every backend of the step ops against the PyTorch reference, on odd shapes and every dtype."""

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_matches_reference

import fastsearch

SHAPES = [(3, 4, 17, 19), (1, 5), (7, 16, 64, 64)]
SMALL_SHAPES = [(3, 4, 17, 19), (1, 5), (2, 3, 33)]


def _schedule(kind, values, device):
    """A schedule argument of each accepted form: float, 0-d tensor, 1-element tensor, [B] tensor."""
    if kind == "float":
        return float(values[0])
    if kind == "0d":
        return torch.tensor(float(values[0]))
    if kind == "one":
        return torch.tensor([float(values[0])], device=device)
    return torch.tensor(values, dtype=torch.float32, device=device)


def _levels(batch, low, high, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(batch, generator=g)).tolist()


def _data(shape, dtype, device, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(count)]


def _compare(fn, device, backend, dtype, inputs):
    """Run ``fn(*inputs, backend=...)`` and the reference; low precision also gets an fp32-math truth."""
    out = fn(*inputs, backend=backend)
    ref = fn(*inputs, backend="torch")
    ref32 = fn(*[t.float() for t in inputs], backend="torch") if dtype != torch.float32 else None
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    refs32 = ref32 if isinstance(ref32, tuple) else (ref32,) * len(outs)
    for o, r, r32 in zip(outs, refs, refs32, strict=True):
        assert o.device.type == device
        assert_matches_reference(o, r, r32)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule_kind", ["float", "0d", "one", "per_sample"])
def test_ddim_step_matches_reference(device, backend, dtype, shape, prediction_type, eta, schedule_kind):
    batch = shape[0]
    alpha = _schedule(schedule_kind, _levels(batch, 0.2, 0.6), device)
    alpha_prev = _schedule(schedule_kind, _levels(batch, 0.65, 0.95, seed=1), device)
    sample, model_output = _data(shape, dtype, device, 2)

    def fn(x, m, backend):
        return fastsearch.ddim_step(x, m, alpha, alpha_prev, eta=eta, seed=11 if eta else None,
                                    prediction_type=prediction_type, backend=backend)

    _compare(fn, device, backend, dtype, (sample, model_output))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_step_clipping_and_noise_tensor(device, backend, dtype, prediction_type, use_clipped_model_output):
    shape = (3, 4, 17, 19)
    alpha = torch.tensor(_levels(3, 0.05, 0.5), device=device)
    sample, model_output, noise = _data(shape, dtype, device, 3, seed=4)

    def fn(x, m, n, backend):
        return fastsearch.ddim_step(x, m, alpha, 0.9, eta=0.7, noise=n, prediction_type=prediction_type,
                                    clip_sample_range=1.0, use_clipped_model_output=use_clipped_model_output,
                                    backend=backend)

    _compare(fn, device, backend, dtype, (sample, model_output, noise))
    prev, x0 = fn(sample, model_output, noise, backend)
    assert x0.float().abs().max() <= 1.0


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("schedule_kind", ["float", "per_sample"])
def test_flow_euler_step_matches_reference(device, backend, dtype, shape, stochastic, schedule_kind):
    batch = shape[0]
    sigma = _schedule(schedule_kind, _levels(batch, 0.3, 1.0), device)
    sigma_next = _schedule(schedule_kind, _levels(batch, 0.0, 0.3, seed=2), device)
    sample, velocity = _data(shape, dtype, device, 2, seed=5)

    def fn(x, v, backend):
        return fastsearch.flow_euler_step(x, v, sigma, sigma_next, seed=3 if stochastic else None,
                                          stochastic=stochastic, backend=backend)

    _compare(fn, device, backend, dtype, (sample, velocity))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("schedule_kind", ["float", "0d", "per_sample"])
def test_flow_heun_step_matches_reference(device, backend, dtype, shape, schedule_kind):
    batch = shape[0]
    sigma = _schedule(schedule_kind, _levels(batch, 0.3, 1.0), device)
    sigma_next = _schedule(schedule_kind, _levels(batch, 0.05, 0.3, seed=3), device)
    inputs = _data(shape, dtype, device, 3, seed=6)

    def fn(x, v1, v2, backend):
        return fastsearch.flow_heun_step(x, v1, v2, sigma, sigma_next, backend=backend)

    _compare(fn, device, backend, dtype, inputs)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("schedule", ["vp", "flow"])
@pytest.mark.parametrize("schedule_kind", ["float", "per_sample"])
def test_renoise_matches_reference(device, backend, dtype, shape, schedule, schedule_kind):
    batch = shape[0]
    if schedule == "vp":
        start, end = _levels(batch, 0.6, 0.9), _levels(batch, 0.1, 0.5, seed=1)
    else:
        start, end = _levels(batch, 0.1, 0.4), _levels(batch, 0.5, 0.95, seed=1)
    level_from, level_to = _schedule(schedule_kind, start, device), _schedule(schedule_kind, end, device)
    (sample,) = _data(shape, dtype, device, 1, seed=7)

    def fn(x, backend):
        return fastsearch.renoise(x, level_from, level_to, schedule=schedule, seed=9, backend=backend)

    _compare(fn, device, backend, dtype, (sample,))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_strided_per_sample_schedule(device, backend):
    """A per-sample schedule that is a strided view (every other value of a tensor) is read as its values."""
    sample, velocity = _data((3, 4, 5), torch.float32, device, 2)
    strided = torch.tensor([0.9, -1.0, 0.7, -1.0, 0.5, -1.0], device=device)[::2]
    steps = (lambda levels, backend: (fastsearch.flow_euler_step(sample, velocity, levels, 0.1, backend=backend),),
             lambda levels, backend: fastsearch.ddim_step(sample, velocity, 0.3, levels, backend=backend))
    for step in steps:
        for got, expected in zip(step(strided, backend), step(strided.contiguous(), "torch"), strict=True):
            assert_matches_reference(got, expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_seed_equals_noise_from_randn(device, backend):
    """``seed=s`` draws exactly ``fastsearch.randn(sample.shape, seed=s)`` in-kernel."""
    shape = (3, 4, 17, 19)
    sample, model_output = _data(shape, torch.float32, device, 2)
    noise = fastsearch.randn(shape, seed=21, device=device, backend="torch")
    by_seed = fastsearch.ddim_step(sample, model_output, 0.3, 0.5, eta=1.0, seed=21, backend=backend)
    by_noise = fastsearch.ddim_step(sample, model_output, 0.3, 0.5, eta=1.0, noise=noise, backend=backend)
    torch.testing.assert_close(by_seed, by_noise, atol=1e-5, rtol=1e-5)
    flow_seed = fastsearch.flow_euler_step(sample, model_output, 0.5, 0.4, seed=21, stochastic=True, backend=backend)
    flow_noise = fastsearch.flow_euler_step(sample, model_output, 0.5, 0.4, noise=noise, stochastic=True,
                                            backend=backend)
    torch.testing.assert_close(flow_seed, flow_noise, atol=1e-5, rtol=1e-5)
    renoised_seed = fastsearch.renoise(sample, 0.2, 0.6, schedule="flow", seed=21, backend=backend)
    renoised_noise = fastsearch.renoise(sample, 0.2, 0.6, schedule="flow", noise=noise, backend=backend)
    torch.testing.assert_close(renoised_seed, renoised_noise, atol=1e-5, rtol=1e-5)


def test_formulas_by_hand():
    """The reference itself against the DESIGN formulas written out for one sample."""
    x, m, noise = torch.tensor([[0.7]]), torch.tensor([[-0.3]]), torch.tensor([[0.25]])
    a, a_prev, eta = 0.4, 0.6, 0.5
    x0 = (0.7 - (1 - a) ** 0.5 * -0.3) / a**0.5
    std = eta * (((1 - a_prev) / (1 - a)) * (1 - a / a_prev)) ** 0.5
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * -0.3 + std * 0.25
    got_prev, got_x0 = fastsearch.ddim_step(x, m, a, a_prev, eta=eta, noise=noise, backend="torch")
    assert got_x0.item() == pytest.approx(x0, rel=1e-6)
    assert got_prev.item() == pytest.approx(prev, rel=1e-6)
    c = (1 - 0.8) / (1 - 0.3)
    expected = c * 0.7 + (0.8**2 - c**2 * 0.3**2) ** 0.5 * 0.25
    got = fastsearch.renoise(x, 0.3, 0.8, schedule="flow", noise=noise, backend="torch")
    assert got.item() == pytest.approx(expected, rel=1e-6)
