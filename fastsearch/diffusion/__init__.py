"""Diffusion and flow samplers with per-sample levels, and search over noises, paths and particles.

- :class:`DDIMSampler`, :class:`FlowSampler`: run samples from any per-sample step to any other on the fused
  step kernels, with exact NFE accounting; build them from diffusers schedulers with ``from_diffusers``.
- :func:`random_search`, :func:`zero_order_search`, :func:`paths_search` (Ma et al. 2025), :func:`fk_steering`
  (Singhal et al. 2025) and the :func:`no_search` baseline, each returning a :class:`NoiseSearchResult`.
- :class:`RandomSearch`, :class:`ZeroOrderSearch`, :class:`PathsSearch`, :class:`FKSteering`: each algorithm's
  options, checked when built; :func:`fastsearch.integrations.diffusers.search_pipeline` takes them.

The searches are built from :mod:`fastsearch.diffusion.core` (result, budgets, ranking, best-so-far tracking, the
zero-order round), :mod:`~fastsearch.diffusion.path_plan` and :mod:`~fastsearch.diffusion.particles`, which the
searches through a diffusers pipeline share.
"""

from fastsearch.diffusion.core import NoiseSearchResult
from fastsearch.diffusion.options import FKSteering, PathsSearch, RandomSearch, ZeroOrderSearch
from fastsearch.diffusion.samplers import DDIMSampler, FlowSampler, Sampler, SamplerOutput
from fastsearch.diffusion.search import (
    fk_steering,
    no_search,
    paths_search,
    random_search,
    zero_order_search,
)

__all__ = [
    "DDIMSampler",
    "FKSteering",
    "FlowSampler",
    "NoiseSearchResult",
    "PathsSearch",
    "RandomSearch",
    "Sampler",
    "SamplerOutput",
    "ZeroOrderSearch",
    "fk_steering",
    "no_search",
    "paths_search",
    "random_search",
    "zero_order_search",
]
