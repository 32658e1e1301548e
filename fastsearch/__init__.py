"""fastsearch: fused, batched kernels for test-time-compute search.

``import fastsearch`` defines the ops, loads the compiled kernels when they were built, and never
initialises CUDA or compiles anything.
"""

from fastsearch import _backend
from fastsearch.ops import ddim_step, flow_euler_step, flow_heun_step, randn, renoise, zo_neighbors

__version__ = "0.1.0"

_backend.load_extension()

backends = _backend.backends

__all__ = [
    "__version__",
    "backends",
    "ddim_step",
    "flow_euler_step",
    "flow_heun_step",
    "randn",
    "renoise",
    "zo_neighbors",
]
