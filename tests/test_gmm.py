"""The analytic Gaussian-mixture model: exact predictions against autograd of the closed-form noised density,
sampling through the samplers reproduces the mixture, verifiers."""

import math

import pytest
import torch

from fastsearch.diffusion import DDIMSampler, FlowSampler
from fastsearch.models import gmm

# small tensors: on a loaded machine intra-op threads only add wake-up latency (seconds per test)
pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture(dim=3):
    generator = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(3, dim, generator=generator, dtype=torch.float64)
    std = 0.2 + torch.rand(3, dim, generator=generator, dtype=torch.float64)  # diagonal
    return gmm.GaussianMixture(means, std, torch.tensor([0.5, 0.3, 0.2]))


def _score(mixture, x, alpha, sigma):
    """grad_x log p_t(x) of the noised mixture, by autograd of its closed-form log-density."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_prob(x, alpha, sigma).sum(), x)
    return grad


def _alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def test_log_prob_is_the_mixture_density():
    mixture = _mixture(dim=2)
    x = torch.randn(5, 2, dtype=torch.float64)
    expected = torch.zeros(5, dtype=torch.float64)
    for k in range(3):
        var = mixture.variances[k]
        density = torch.exp(-0.5 * ((x - mixture.means[k]) ** 2 / var).sum(-1)) / torch.sqrt((2 * math.pi * var).prod())
        expected += mixture.weights[k] * density
    torch.testing.assert_close(mixture.log_prob(x), expected.log())


@pytest.mark.parametrize("std", [0.5, torch.tensor([0.3, 0.6, 0.9]), None], ids=["shared", "per-component",
                                                                               "diagonal"])
def test_epsilon_is_minus_sigma_times_the_score(std):
    """VP: eps(x_t) = -sqrt(1 - a) grad log p_t(x_t), at every noise level."""
    mixture = _mixture()
    if std is not None:
        mixture = gmm.GaussianMixture(mixture.means, std, torch.tensor([0.2, 0.5, 0.3]))
    alphas_cumprod = _alphas_cumprod()
    timesteps = torch.tensor([0, 10, 250, 500, 999, 999])
    alpha_prod = alphas_cumprod[timesteps]
    x = 1.5 * torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = mixture.vp_model(alphas_cumprod)(x, timesteps)
    score = _score(mixture, x, alpha_prod.sqrt(), (1 - alpha_prod).sqrt())
    torch.testing.assert_close(eps, -(1 - alpha_prod).sqrt()[:, None] * score, rtol=1e-9, atol=1e-10)


def test_velocity_is_the_flow_of_the_noised_mixture():
    """Rectified flow: v = E[n - x0 | x_s] = (-s grad log p_s(x) - x) / (1 - s); at s = 1, x - E[x0]."""
    mixture = _mixture()
    model = mixture.flow_model()
    sigma = torch.tensor([0.001, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    velocity = model(x, sigma)
    score = _score(mixture, x, 1 - sigma, sigma)
    expected = (-sigma[:, None] * score - x) / (1 - sigma)[:, None]
    torch.testing.assert_close(velocity, expected, rtol=1e-8, atol=1e-9)
    at_noise = model(x, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(at_noise, x - mixture.mean)


def test_prediction_types_agree():
    mixture = _mixture()
    alphas_cumprod = _alphas_cumprod()
    timesteps = torch.tensor([3, 400, 990])
    alpha = alphas_cumprod[timesteps].sqrt()[:, None]
    sigma = (1 - alphas_cumprod[timesteps]).sqrt()[:, None]
    x = torch.randn(3, 3, dtype=torch.float64)
    eps = mixture.vp_model(alphas_cumprod)(x, timesteps)
    x0 = mixture.vp_model(alphas_cumprod, prediction_type="sample")(x, timesteps)
    v = mixture.vp_model(alphas_cumprod, prediction_type="v_prediction")(x, timesteps)
    torch.testing.assert_close(x0, (x - sigma * eps) / alpha)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    assert mixture.vp_model(alphas_cumprod)(x.float(), timesteps).dtype == torch.float32


def test_exact_draws_have_the_mixture_moments():
    mixture = gmm.rare_mode_mixture(2, rare_weight=0.1)
    draws = mixture.sample(100_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(draws.mean(0), mixture.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), mixture.covariance, atol=0.03, rtol=0)


def _check_moments(samples, mixture):
    """Mean, covariance and mode frequencies within ~4.5 standard errors of a sample of this size."""
    n = samples.shape[0]
    samples = samples.double()
    std = mixture.covariance.diagonal().sqrt()
    assert ((samples.mean(0) - mixture.mean).abs() <= 4.5 * std / math.sqrt(n)).all()
    cov = torch.cov(samples.T)
    assert ((cov - mixture.covariance).abs() <= 4.5 * math.sqrt(2.0 / n) * torch.outer(std, std) * 2).all()
    frequency = mixture.posterior(samples).argmax(1).bincount(minlength=mixture.num_components) / n
    weights = mixture.weights
    assert ((frequency - weights).abs() <= 4.5 * (weights * (1 - weights) / n).sqrt()).all()


@pytest.mark.parametrize("kind", ["ddim-epsilon", "ddim-v", "flow-euler", "flow-heun"])
def test_sampling_the_model_gives_the_mixture(kind):
    mixture = gmm.rare_mode_mixture(2, rare_weight=0.1)
    alphas_cumprod = _alphas_cumprod().float()
    if kind.startswith("ddim"):
        prediction_type = "epsilon" if kind == "ddim-epsilon" else "v_prediction"
        sampler = DDIMSampler(alphas_cumprod, 100, prediction_type=prediction_type, timestep_spacing="trailing")
        model = mixture.vp_model(alphas_cumprod, prediction_type=prediction_type)
    else:
        sampler = FlowSampler(100 if kind == "flow-euler" else 50, solver=kind.split("-")[1])
        model = mixture.flow_model()
    noise = torch.randn(6000, 2, generator=torch.Generator().manual_seed(4))
    _check_moments(sampler.sample(model, noise).sample, mixture)


def test_verifiers():
    mixture = _mixture()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    log_density = gmm.ModeLogDensity(mixture, component=1)(x0)
    var = mixture.variances[1]
    expected = -0.5 * ((x0 - mixture.means[1]) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
    torch.testing.assert_close(log_density, expected.float())
    assert log_density.dtype == torch.float32
    per_sample = gmm.ModeLogDensity(mixture)(x0, component=torch.tensor([1, 1, 0, 2]))
    torch.testing.assert_close(per_sample[:2], expected[:2].float())
    assert gmm.ModeLogDensity(mixture)(mixture.means[2:3]).item() > gmm.ModeLogDensity(mixture)(mixture.means[:1])
    posterior = torch.stack([gmm.ComponentPosterior(mixture, component=k)(x0) for k in range(3)], dim=1)
    torch.testing.assert_close(posterior.sum(1), torch.ones(4))
    torch.testing.assert_close(posterior, mixture.posterior(x0).float())
    torch.testing.assert_close(gmm.ComponentPosterior(mixture)(x0, component=1), posterior[:, 1])


def test_rare_mode_mixture():
    mixture = gmm.rare_mode_mixture(2, num_components=5, rare_weight=0.01)
    assert mixture.num_components == 5 and mixture.dim == 2
    torch.testing.assert_close(mixture.weights[-1], torch.tensor(0.01, dtype=torch.float64))
    torch.testing.assert_close(mixture.means.norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))
    high = gmm.rare_mode_mixture(64, seed=3)
    assert high.dim == 64
    torch.testing.assert_close(high.means, gmm.rare_mode_mixture(64, seed=3).means)


def test_bad_input():
    mixture = gmm.rare_mode_mixture(2)
    with pytest.raises(ValueError, match="shape"):
        mixture.flow_model()(torch.randn(3, 4), torch.rand(3))
    with pytest.raises(ValueError, match="level"):
        mixture.flow_model()(torch.randn(3, 2), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="level"):
        mixture.vp_model(_alphas_cumprod())(torch.randn(3, 2), torch.rand(3))
    with pytest.raises(ValueError, match="std"):
        gmm.GaussianMixture(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        gmm.GaussianMixture(torch.zeros(2, 2), 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="means"):
        gmm.GaussianMixture(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="component"):
        gmm.ModeLogDensity(mixture, component=7)
    with pytest.raises(ValueError, match="rare_weight"):
        gmm.rare_mode_mixture(2, rare_weight=1.5)
    with pytest.raises(ValueError, match="prediction_type"):
        mixture.vp_model(_alphas_cumprod(), prediction_type="score")
