"""diffusers drop-ins: schedulers whose ``step`` is one fused kernel, and noise search through a pipeline.

- :class:`FastDDIMScheduler` and :class:`FastFlowMatchEulerDiscreteScheduler` (:mod:`.schedulers`) subclass
  diffusers' ``DDIMScheduler`` and ``FlowMatchEulerDiscreteScheduler``: same config (``from_config`` works both
  ways), same outputs, and ``step`` also takes a [B] tensor of per-sample timesteps.
- :func:`search_pipeline` (:mod:`.pipeline`) runs a noise search through any pipeline that takes ``latents=``
  (random and zero-order search), or steers its scheduler inside one call (search over paths and FK steering,
  :mod:`.steering`), with the options objects and the shared search core of :mod:`fastsearch.diffusion`.
  :func:`default_decoder` is how it turns mid-trajectory latents into the pipeline's images.

Needs the ``diffusers`` extra.
"""

import importlib.util

if importlib.util.find_spec("diffusers") is None:
    raise ImportError("fastsearch.integrations.diffusers needs diffusers: pip install 'fastsearch[diffusers]'")

from fastsearch.integrations.diffusers.pipeline import search_pipeline
from fastsearch.integrations.diffusers.schedulers import FastDDIMScheduler, FastFlowMatchEulerDiscreteScheduler
from fastsearch.integrations.diffusers.steering import default_decoder

__all__ = ["FastDDIMScheduler", "FastFlowMatchEulerDiscreteScheduler", "default_decoder", "search_pipeline"]
