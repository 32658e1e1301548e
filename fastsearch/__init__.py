"""fastsearch: fused, batched kernels for test-time-compute search.

``import fastsearch`` defines the ops, loads the compiled kernels when they were built, and never
initialises CUDA or compiles anything.
"""

from fastsearch import _backend
from fastsearch.ops import (
    BeamSelection,
    beam_prune,
    ddim_step,
    effective_sample_size,
    flow_euler_step,
    flow_heun_step,
    randn,
    renoise,
    resample,
    segmented_topk,
    sequence_keys,
    vote,
    zo_neighbors,
)

__version__ = "0.1.0"

_backend.load_extension()

backends = _backend.backends

__all__ = [
    "BeamSelection",
    "__version__",
    "backends",
    "beam_prune",
    "ddim_step",
    "effective_sample_size",
    "flow_euler_step",
    "flow_heun_step",
    "randn",
    "renoise",
    "resample",
    "segmented_topk",
    "sequence_keys",
    "vote",
    "zo_neighbors",
]
