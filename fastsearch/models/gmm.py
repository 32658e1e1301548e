"""An analytic Gaussian-mixture diffusion / flow model and its verifiers.

Data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` in d dimensions. Noised with ``x = alpha x0 + sigma n``
(``n ~ N(0, I)``), every component stays Gaussian, ``N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``, so the
noised density, its score and the posterior means ``E[x0 | x]`` and ``E[n | x]`` are closed-form:

- VP diffusion (``x_t = sqrt(a) x0 + sqrt(1 - a) eps``): alpha = sqrt(a), sigma = sqrt(1 - a); the exact
  epsilon prediction is ``E[eps | x_t] = -sqrt(1 - a) grad log p_t(x_t)``.
- Rectified flow (``x_s = (1 - s) x0 + s n``): alpha = 1 - s, sigma = s; the exact velocity is
  ``E[n - x0 | x_s]``.

Per component ``k`` with ``V_k = diag(s_k^2)`` and ``C_k = alpha^2 V_k + sigma^2 I``:
``E[n | x, k] = sigma C_k^-1 (x - alpha mu_k)`` and ``E[x0 | x, k] = mu_k + alpha V_k C_k^-1 (x - alpha mu_k)``,
averaged with the posterior ``p(k | x)``. These stay finite at both ends (``sigma = 0`` and ``alpha = 0``),
unlike Tweedie's formula written through the score.

The denoisers follow fastsearch's protocol ``model(x, level, **cond)``; the verifiers ``verifier(x0, **cond)``
return one score per sample, higher is better. The model is unconditional: keyword conditioning is accepted and
ignored, so that the same ``cond`` (e.g. ``component=`` for each prompt) can drive the verifier.

Example:
    >>> mixture = rare_mode_mixture(dim=2)
    >>> sampler = fastsearch.diffusion.FlowSampler(20)
    >>> result = fastsearch.diffusion.random_search(mixture.flow_model(), ModeLogDensity(mixture), sampler, (2,),
    ...                                             num_candidates=32, seed=0)
"""

from __future__ import annotations

import math

import torch

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 inputs are computed in fp32; fp32 and fp64 in their own precision."""
    return torch.promote_types(dtype, torch.float32)


class GaussianMixture:
    """A mixture of K Gaussians with diagonal covariance in d dimensions.

    Args:
        means: [K, d] floating-point tensor of component means.
        std: standard deviations: a float (all components, isotropic), a [K] tensor (isotropic per component)
            or a [K, d] tensor (diagonal). All positive.
        weights: [K] positive mixture weights (normalised here); None for equal weights.

    Attributes:
        means: [K, d]; ``variances``: [K, d]; ``log_weights``: [K] (normalised); all float64 on the means'
        device (converted to the input's precision in every call).
    """

    def __init__(self, means: torch.Tensor, std, weights: torch.Tensor | None = None):
        if not isinstance(means, torch.Tensor) or not means.is_floating_point() or means.dim() != 2:
            raise ValueError(f"means must be a floating-point tensor of shape [K, d], got {_describe(means)}")
        num_components, dim = means.shape
        if num_components < 1 or dim < 1:
            raise ValueError(f"means must hold at least one component of at least one dimension, got shape "
                             f"{list(means.shape)}")
        std = torch.as_tensor(std, dtype=torch.float64, device=means.device)
        if std.dim() == 0:
            std = std.expand(num_components, dim)
        elif std.shape == (num_components,):
            std = std[:, None].expand(num_components, dim)
        elif std.shape != (num_components, dim):
            raise ValueError(f"std must be a float, a [K={num_components}] or a [K, d]={[num_components, dim]} "
                             f"tensor, got shape {list(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive")
        if weights is None:
            weights = torch.ones(num_components, dtype=torch.float64, device=means.device)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=means.device)
        if weights.shape != (num_components,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be a [K={num_components}] tensor of positive values, got "
                             f"{weights.tolist() if weights.dim() <= 1 else list(weights.shape)}")
        self.means = means.to(torch.float64)
        self.variances = (std * std).contiguous()
        self.log_weights = torch.log(weights / weights.sum())

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> torch.Tensor:
        """[K] float64 normalised weights."""
        return self.log_weights.exp()

    @property
    def mean(self) -> torch.Tensor:
        """[d] float64 mean of the mixture."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """[d, d] float64 covariance of the mixture: ``sum_k w_k (V_k + mu_k mu_k^T) - mean mean^T``."""
        weights = self.weights
        second = torch.diag(weights @ self.variances) + (self.means.T * weights) @ self.means
        return second - torch.outer(self.mean, self.mean)

    def to(self, device) -> GaussianMixture:
        """This mixture with its parameters on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.means.device == device:
            return self
        moved = GaussianMixture.__new__(GaussianMixture)
        moved.means = self.means.to(device)
        moved.variances = self.variances.to(device)
        moved.log_weights = self.log_weights.to(device)
        return moved

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact draws from the mixture: [num_samples, d] of ``dtype`` on the means' device."""
        component = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        noise = torch.randn(num_samples, self.dim, dtype=torch.float64, generator=generator,
                            device=self.means.device)
        return (self.means[component] + self.variances[component].sqrt() * noise).to(dtype)

    # -- the noised mixture ------------------------------------------------------------------------------

    def _components(self, x: torch.Tensor, alpha, sigma):
        """Per-component terms of the noised mixture at ``x`` [B, d]: log joint [B, K], the centred sample
        ``x - alpha mu_k`` [B, K, d], ``C_k`` [B or 1, K, d], alpha and sigma as [B or 1, 1, 1]."""
        self._check_input("x", x)
        dtype = _math_dtype(x.dtype)
        x = x.to(dtype)
        alpha = torch.as_tensor(alpha, dtype=dtype, device=x.device).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1, 1, 1)
        means, variances = self.means.to(dtype), self.variances.to(dtype)
        centred = x[:, None, :] - alpha * means
        noised_var = alpha * alpha * variances + sigma * sigma
        log_joint = self.log_weights.to(dtype) - 0.5 * (
            centred * centred / noised_var + torch.log(2 * math.pi * noised_var)).sum(-1)
        return log_joint, centred, noised_var, alpha, sigma

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """Log-density of ``alpha x0 + sigma n`` at ``x``.

        Args:
            x: [B, d] floating point.
            alpha, sigma: floats or [B] tensors (signal and noise scales); the defaults give the data density.

        Returns:
            [B] in ``x``'s precision (at least float32).
        """
        return torch.logsumexp(self._components(x, alpha, sigma)[0], dim=-1)

    def posterior(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """Component posterior ``p(k | x)`` of the noised mixture: [B, K] (rows sum to 1)."""
        return torch.softmax(self._components(x, alpha, sigma)[0], dim=-1)

    def denoise(self, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means ``(E[x0 | x], E[n | x])`` for ``x = alpha x0 + sigma n``, each [B, d] in ``x``'s
        precision (at least float32). ``alpha`` and ``sigma`` are floats or [B] tensors."""
        log_joint, centred, noised_var, alpha, sigma = self._components(x, alpha, sigma)
        responsibility = torch.softmax(log_joint, dim=-1)[..., None]
        whitened = centred / noised_var
        noise = (responsibility * sigma * whitened).sum(1)
        means, variances = self.means.to(whitened.dtype), self.variances.to(whitened.dtype)
        clean = (responsibility * (means + alpha * variances * whitened)).sum(1)
        return clean, noise

    def _check_input(self, name: str, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(x)}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [B, {self.dim}] (samples of shape [{self.dim}]), got "
                             f"{list(x.shape)}")

    # -- denoisers -----------------------------------------------------------------------------------------

    def vp_model(self, alphas_cumprod: torch.Tensor, *, prediction_type: str = "epsilon") -> VPDenoiser:
        """The exact VP denoiser for the schedule ``alphas_cumprod`` (see :class:`VPDenoiser`)."""
        return VPDenoiser(self, alphas_cumprod, prediction_type=prediction_type)

    def flow_model(self) -> FlowDenoiser:
        """The exact rectified-flow velocity model (see :class:`FlowDenoiser`)."""
        return FlowDenoiser(self)


class VPDenoiser:
    """Exact VP model of a :class:`GaussianMixture`: ``model(x, timestep, **cond)``.

    Args:
        mixture: the data distribution.
        alphas_cumprod: [T] float tensor, the training schedule (e.g. a diffusers scheduler's).
        prediction_type: ``"epsilon"`` (``E[eps | x_t]``), ``"sample"`` (``E[x0 | x_t]``) or ``"v_prediction"``
            (``sqrt(a) E[eps] - sqrt(1 - a) E[x0]``).

    Call:
        x: [B, d] float32 / float16 / bfloat16 / float64; timestep: [B] integer tensor indexing
        ``alphas_cumprod``; cond: ignored. Returns [B, d] like ``x``.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor, *, prediction_type: str = "epsilon"):
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(_PREDICTION_TYPES)}, got {prediction_type!r}")
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
            raise ValueError(f"alphas_cumprod must be a 1-D floating-point tensor, got {_describe(alphas_cumprod)}")
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction_type = prediction_type

    def __call__(self, x: torch.Tensor, level: torch.Tensor, **cond) -> torch.Tensor:
        if not isinstance(level, torch.Tensor) or level.is_floating_point() or level.shape != x.shape[:1]:
            raise ValueError(f"level must be an integer tensor of shape [B]={list(x.shape[:1])} (timesteps), got "
                             f"{_describe(level)}")
        alpha_prod = self.alphas_cumprod.to(level.device)[level.long()]
        alpha, sigma = alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt()
        clean, noise = self.mixture.to(x.device).denoise(x, alpha, sigma)
        if self.prediction_type == "epsilon":
            out = noise
        elif self.prediction_type == "sample":
            out = clean
        else:
            out = alpha.to(noise.dtype)[:, None] * noise - sigma.to(noise.dtype)[:, None] * clean
        return out.to(x.dtype)


class FlowDenoiser:
    """Exact rectified-flow velocity ``E[n - x0 | x_s]`` of a :class:`GaussianMixture`: ``model(x, sigma, **cond)``.

    Call:
        x: [B, d] float32 / float16 / bfloat16 / float64; sigma: [B] float tensor in [0, 1]; cond: ignored.
        Returns [B, d] like ``x``.
    """

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def __call__(self, x: torch.Tensor, level: torch.Tensor, **cond) -> torch.Tensor:
        if not isinstance(level, torch.Tensor) or not level.is_floating_point() or level.shape != x.shape[:1]:
            raise ValueError(f"level must be a floating-point tensor of shape [B]={list(x.shape[:1])} (sigmas), got "
                             f"{_describe(level)}")
        sigma = level.to(_math_dtype(x.dtype))
        clean, noise = self.mixture.to(x.device).denoise(x, 1.0 - sigma, sigma)
        return (noise - clean).to(x.dtype)


# -- verifiers -----------------------------------------------------------------------------------------------


class _ComponentVerifier:
    def __init__(self, mixture: GaussianMixture, component: int = -1):
        self.mixture = mixture
        self.component = self._index(component)

    def _index(self, component: int) -> int:
        count = self.mixture.num_components
        if isinstance(component, bool) or not isinstance(component, int) or not -count <= component < count:
            raise ValueError(f"component must be an int in [-{count}, {count}), got {component!r}")
        return component % count

    def _components(self, x0: torch.Tensor, component) -> torch.Tensor:
        """The chosen component per sample: [B] int64."""
        if component is None:
            component = self.component
        if isinstance(component, torch.Tensor):
            if component.is_floating_point() or component.shape not in (torch.Size([]), x0.shape[:1]):
                raise ValueError(f"component must be an int or an integer tensor of shape [B]={list(x0.shape[:1])}, "
                                 f"got {_describe(component)}")
            count = self.mixture.num_components
            if component.numel() and bool(((component < -count) | (component >= count)).any()):
                raise ValueError(f"component values must be in [-{count}, {count})")
            return (component.long() % count).to(x0.device).expand(x0.shape[0])
        return torch.full((x0.shape[0],), self._index(component), dtype=torch.long, device=x0.device)


class ModeLogDensity(_ComponentVerifier):
    """Verifier: log-density of one mixture component (mode) at the sample, ``log N(x0; mu_k, V_k)``.

    Args:
        mixture: the mixture.
        component: the default component (an int; -1, the last, is the rare mode of :func:`rare_mode_mixture`).

    Call:
        ``verifier(x0, component=None, **cond)``: x0 [B, d]; ``component`` (int or [B] integer tensor)
        overrides the default per sample; other cond is ignored. Returns [B] float32.
    """

    def __call__(self, x0: torch.Tensor, component=None, **cond) -> torch.Tensor:
        self.mixture._check_input("x0", x0)
        chosen = self._components(x0, component)
        dtype = _math_dtype(x0.dtype)
        mixture = self.mixture.to(x0.device)
        means, variances = mixture.means.to(dtype)[chosen], mixture.variances.to(dtype)[chosen]
        centred = x0.to(dtype) - means
        log_density = -0.5 * (centred * centred / variances + torch.log(2 * math.pi * variances)).sum(-1)
        return log_density.float()


class ComponentPosterior(_ComponentVerifier):
    """Verifier: class posterior ``p(component k | x0)`` of the clean mixture, in [0, 1].

    Args:
        mixture: the mixture.
        component: the default component (an int; -1 is the last).

    Call:
        ``verifier(x0, component=None, **cond)``: x0 [B, d]; ``component`` (int or [B] integer tensor)
        overrides the default per sample; other cond is ignored. Returns [B] float32.
    """

    def __call__(self, x0: torch.Tensor, component=None, **cond) -> torch.Tensor:
        chosen = self._components(x0, component)
        posterior = self.mixture.to(x0.device).posterior(x0)
        return posterior.gather(1, chosen[:, None]).squeeze(1).float()


def rare_mode_mixture(dim: int = 2, *, num_components: int = 4, rare_weight: float = 0.02, radius: float = 2.0,
                      std: float = 0.25, seed: int = 0, device=None) -> GaussianMixture:
    """A mixture whose last component is a rare mode, so that noise search visibly helps.

    The K - 1 common components share ``1 - rare_weight`` equally; the last component (index K - 1, the
    default of the verifiers) has weight ``rare_weight``. Means lie at distance ``radius`` from the origin:
    evenly spaced on a circle for ``dim == 2``; along random directions (a seeded generator) otherwise.
    Every component has isotropic standard deviation ``std``.

    Args:
        dim: d >= 1.
        num_components: K >= 2.
        rare_weight: weight of the rare mode, in (0, 1).
        radius, std: positive floats.
        seed: seeds the directions for ``dim != 2``.
        device: of the parameters.

    Returns:
        the :class:`GaussianMixture`.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 2:
        raise ValueError(f"num_components must be an int >= 2, got {num_components!r}")
    if not 0.0 < rare_weight < 1.0:
        raise ValueError(f"rare_weight must be in (0, 1), got {rare_weight}")
    if not radius > 0 or not std > 0:
        raise ValueError(f"radius and std must be positive, got radius={radius}, std={std}")
    if dim == 2:
        angle = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
        directions = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    else:
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(num_components, dim, dtype=torch.float64, generator=generator)
        directions = directions / directions.norm(dim=-1, keepdim=True)
    weights = torch.full((num_components,), (1.0 - rare_weight) / (num_components - 1), dtype=torch.float64)
    weights[-1] = rare_weight
    return GaussianMixture((radius * directions).to(device), std, weights.to(device))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"
