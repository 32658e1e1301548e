"""fastsearch: fused, batched kernels for test-time-compute search.

``import fastsearch`` defines the ops, loads the compiled kernels when they were built, and never
initialises CUDA or compiles anything.
"""

from fastsearch import _backend, ops
from fastsearch.ops import *  # noqa: F403 - the public ops are the package's API

__version__ = "0.1.0"

_backend.load_extension()

backends = _backend.backends

__all__ = ["__version__", "backends", *ops.__all__]
