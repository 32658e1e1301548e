"""Whole sampling trajectories against diffusers' own schedulers (fp32, 1e-5)."""

import pytest
import torch
from helpers import ALL_BACKENDS

import fastsearch

diffusers = pytest.importorskip("diffusers")

NUM_STEPS = 50


def _assert_close(out, expected, conditioning=1.0):
    """fp32 to 1e-5 relative to the sample's scale. ``conditioning`` widens it for quantities that
    amplify input differences: the x0 prediction at a noisy step divides by sqrt(alpha_prod_t), so a
    1-ulp difference in x_t (kernels fuse and associate differently from diffusers) grows by that factor."""
    scale = max(1.0, expected.abs().max().item())
    err = (out.cpu() - expected).abs().max().item()
    assert err <= 1e-5 * scale * conditioning, f"max error {err} > 1e-5 x scale {scale} x {conditioning}"


def _model(x, t):
    """A fixed, smooth stand-in for a denoiser: output depends on the sample and the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.4 * x * torch.cos(t / 300) + 0.2 * torch.sin(1.7 * x + t / 97)


def _ddim_levels(scheduler, t):
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return alpha, alpha_prev


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_trajectory_matches_diffusers(device, backend, prediction_type, eta, clip_sample):
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    scheduler.set_timesteps(NUM_STEPS)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 3, 9, 11, generator=g)
    x = x_ref.clone().to(device)
    for t in scheduler.timesteps:
        noise = torch.randn(x_ref.shape, generator=g)
        out = scheduler.step(_model(x_ref, t), t, x_ref, eta=eta, variance_noise=noise)
        alpha, alpha_prev = _ddim_levels(scheduler, int(t))
        x, x0 = fastsearch.ddim_step(x, _model(x, t.to(device)), alpha, alpha_prev, eta=eta, noise=noise.to(device),
                                     prediction_type=prediction_type,
                                     clip_sample_range=scheduler.config.clip_sample_range if clip_sample else None,
                                     backend=backend)
        _assert_close(x0, out.pred_original_sample, conditioning=float(alpha) ** -0.5)
        x_ref = out.prev_sample
    _assert_close(x, x_ref)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_ddim_per_sample_timesteps_match_separate_diffusers_steps(device, backend):
    """One batched call with a different timestep per sample equals diffusers run sample by sample."""
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = [int(scheduler.timesteps[i]) for i in (0, 17, 33, 49)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(x.shape, generator=g)
    levels = [_ddim_levels(scheduler, t) for t in timesteps]
    alpha = torch.stack([a for a, _ in levels]).to(device)
    alpha_prev = torch.stack([torch.as_tensor(a) for _, a in levels]).float().to(device)
    eps = _model(x, torch.tensor(timesteps, dtype=torch.float32))
    prev, _ = fastsearch.ddim_step(x.to(device), eps.to(device), alpha, alpha_prev, eta=0.5, noise=noise.to(device),
                                   backend=backend)
    for i, t in enumerate(timesteps):
        expected = scheduler.step(eps[i:i + 1], t, x[i:i + 1], eta=0.5, variance_noise=noise[i:i + 1]).prev_sample
        _assert_close(prev[i:i + 1], expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_trajectory_matches_diffusers(device, backend, shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(NUM_STEPS)
    g = torch.Generator().manual_seed(2)
    x_ref = torch.randn(2, 4, 7, 13, generator=g)
    x = x_ref.clone().to(device)
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        x_ref = scheduler.step(_model(x_ref, t), t, x_ref).prev_sample
        x = fastsearch.flow_euler_step(x, _model(x, t.to(device)), sigma, sigma_next, backend=backend)
    _assert_close(x, x_ref)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_flow_heun_trajectory_matches_diffusers(device, backend):
    """Euler predictor + our corrector, plain Euler into sigma 0: FlowMatchHeunDiscreteScheduler's steps."""
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler()
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    x_ref = torch.randn(2, 3, 5, 6, generator=g)
    x = x_ref.clone().to(device)
    for t in scheduler.timesteps:
        x_ref = scheduler.step(_model(x_ref, t), t, x_ref).prev_sample
    # diffusers calls the model twice per Heun step: timesteps (t_i, t_i+1) for sigmas (s_i, s_i+1).
    sigmas = torch.unique_consecutive(scheduler.sigmas)
    calls = iter(scheduler.timesteps)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v1 = _model(x, next(calls).to(device))
        predicted = fastsearch.flow_euler_step(x, v1, sigma, sigma_next, backend=backend)
        if sigma_next == 0:
            x = predicted
            continue
        v2 = _model(predicted, next(calls).to(device))
        x = fastsearch.flow_heun_step(x, v1, v2, sigma, sigma_next, backend=backend)
    _assert_close(x, x_ref)
