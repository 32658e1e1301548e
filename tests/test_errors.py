"""Bad input raises ValueError / TypeError naming the argument, on every backend, before any kernel runs."""

import pytest
import torch
from helpers import ALL_BACKENDS

import fastsearch
from fastsearch import _backend


def _pair(device, shape=(3, 4, 5), dtype=torch.float32):
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_shape_mismatch(device, backend):
    x, _ = _pair(device)
    with pytest.raises(ValueError, match="model_output"):
        fastsearch.ddim_step(x, torch.randn(3, 4, 6, device=device), 0.5, 0.6, backend=backend)
    with pytest.raises(ValueError, match="velocity_next"):
        fastsearch.flow_heun_step(x, x, torch.randn(3, 5, 4, device=device), 0.5, 0.4, backend=backend)
    with pytest.raises(ValueError, match="noise"):
        fastsearch.renoise(x, 0.5, 0.3, noise=torch.randn(2, 4, 5, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_per_sample_schedule_with_wrong_batch(device, backend):
    x, m = _pair(device)
    with pytest.raises(ValueError, match="alpha_prod_t_prev"):
        fastsearch.ddim_step(x, m, 0.5, torch.full((4,), 0.6, device=device), backend=backend)
    with pytest.raises(ValueError, match="sigma"):
        fastsearch.flow_euler_step(x, m, torch.full((2,), 0.6, device=device), 0.5, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_wrong_dtypes(device, backend):
    x, m = _pair(device)
    with pytest.raises(TypeError, match="sample"):
        fastsearch.ddim_step(x.long(), m.long(), 0.5, 0.6, backend=backend)
    with pytest.raises(TypeError, match="model_output"):
        fastsearch.ddim_step(x, m.half(), 0.5, 0.6, backend=backend)
    with pytest.raises(TypeError, match="alpha_prod_t"):
        fastsearch.ddim_step(x, m, torch.ones(3, dtype=torch.long, device=device), 0.6, backend=backend)
    with pytest.raises(TypeError, match="pivot"):
        fastsearch.zo_neighbors(x.int(), 2, seed=0, backend=backend)
    with pytest.raises(TypeError, match="seed"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, eta=1.0, seed=1.5, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_mixed_devices(device, backend):
    x, m = _pair(device)
    with pytest.raises(ValueError, match="alpha_prod_t"):
        fastsearch.ddim_step(x, m, torch.full((3,), 0.5, device="meta"), 0.6, backend=backend)
    if torch.cuda.is_available():
        other = "cpu" if device == "cuda" else "cuda"
        with pytest.raises(ValueError, match="model_output"):
            fastsearch.ddim_step(x, m.to(other), 0.5, 0.6, backend=backend)
        with pytest.raises(ValueError, match="noise"):
            fastsearch.ddim_step(x, m, 0.5, 0.6, eta=1.0, noise=m.to(other), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_options(device, backend):
    x, m = _pair(device)
    with pytest.raises(ValueError, match="prediction_type"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, prediction_type="flow", backend=backend)
    with pytest.raises(ValueError, match="noise or seed"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, eta=1.0, noise=m, seed=3, backend=backend)
    with pytest.raises(ValueError, match="eta"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, eta=-0.1, backend=backend)
    with pytest.raises(ValueError, match="clip_sample_range"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, clip_sample_range=0.0, backend=backend)
    with pytest.raises(ValueError, match="stochastic"):
        fastsearch.flow_euler_step(x, m, 0.5, 0.4, seed=3, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        fastsearch.flow_euler_step(x, m, 0.5, 0.4, seed=-1, stochastic=True, backend=backend)
    with pytest.raises(ValueError, match="schedule"):
        fastsearch.renoise(x, 0.5, 0.3, schedule="ve", backend=backend)
    with pytest.raises(ValueError, match="level_to"):
        fastsearch.renoise(x, 0.3, 0.5, schedule="vp", seed=0, backend=backend)
    if device == "cpu":  # per-sample levels are checked where that needs no device sync
        with pytest.raises(ValueError, match="level_to"):
            fastsearch.renoise(x, torch.full((3,), 0.5), torch.full((3,), 0.3), schedule="flow", seed=0,
                               backend=backend)
    with pytest.raises(ValueError, match="num_neighbors"):
        fastsearch.zo_neighbors(x, 0, seed=0, backend=backend)
    with pytest.raises(ValueError, match="cos_sim"):
        fastsearch.zo_neighbors(x, 2, cos_sim=1.5, seed=0, backend=backend)
    with pytest.raises(ValueError, match="at least 2 elements"):
        fastsearch.zo_neighbors(torch.randn(4, 1, device=device), 2, seed=0, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        fastsearch.randn((3,), seed=0, offset=-1, device=device, backend=backend)


def test_unknown_or_impossible_backend(monkeypatch):
    monkeypatch.setattr(_backend, "_cuda_emulation", None)  # the test tool that runs "cuda" on CPU tensors
    x, m = _pair("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastsearch.ddim_step(x, m, 0.5, 0.6, backend="cuda")
    with pytest.raises(TypeError, match="alpha_prod_t"):
        fastsearch.ddim_step(x, m, "0.5", 0.6)
    with pytest.raises(TypeError, match="sample"):
        fastsearch.ddim_step(x.numpy(), m, 0.5, 0.6)
