"""Diffusion and flow samplers with per-sample levels, and search over noises, paths and particles.

- :class:`DDIMSampler`, :class:`FlowSampler`: run samples from any per-sample step to any other on the fused
  step kernels, with exact NFE accounting; build them from diffusers schedulers with ``from_diffusers``.
- :func:`random_search`, :func:`zero_order_search`, :func:`paths_search` (Ma et al. 2025), :func:`fk_steering`
  (Singhal et al. 2025) and the :func:`no_search` baseline, each returning a :class:`SearchResult`.
"""

from fastsearch.diffusion.samplers import DDIMSampler, FlowSampler, Sampler, SamplerOutput
from fastsearch.diffusion.search import (
    SearchResult,
    fk_steering,
    no_search,
    paths_search,
    random_search,
    zero_order_search,
)

__all__ = [
    "DDIMSampler",
    "FlowSampler",
    "Sampler",
    "SamplerOutput",
    "SearchResult",
    "fk_steering",
    "no_search",
    "paths_search",
    "random_search",
    "zero_order_search",
]
