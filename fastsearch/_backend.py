"""Which backends exist in this process, and which one runs a given call.

Backends:
  ``torch``   the pure-PyTorch reference (any device; the oracle and the fallback)
  ``cpu``     C++ kernels in ``fastsearch._C`` (CPU tensors)
  ``cuda``    CUDA kernels in ``fastsearch._C`` (CUDA tensors; only in a CUDA build)
  ``triton``  Triton kernels (CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1``)

Nothing here initialises CUDA or compiles anything at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

_ext = None
_ext_error: str | None = None
# (op, dispatch key) pairs the compiled extension registered; a plain set so torch.compile can read it.
_native_kernels: frozenset[tuple[str, str]] = frozenset()

# For CUDA tensors ``auto`` takes the faster compiled backend per op, as measured by
# ``fastsearch bench`` on an H100 / H200 (benchmarks/results/). Ops not listed (nothing measured
# yet) prefer the CUDA C++ kernels, then Triton.
AUTO_CUDA_PREFERENCE: dict[str, str] = {}


def load_extension() -> None:
    """Import ``fastsearch._C`` once; on failure remember why and say so once."""
    global _ext, _ext_error, _native_kernels
    if _ext is not None or _ext_error is not None:
        return
    if os.environ.get("FASTSEARCH_NO_EXT") == "1":
        _ext_error = "FASTSEARCH_NO_EXT=1"
    else:
        try:
            _ext = importlib.import_module("fastsearch._C")
        except ImportError as exc:
            _ext_error = str(exc)
        else:
            _read_native_kernels()
    if _ext is None:
        warnings.warn(
            f"fastsearch: compiled kernels unavailable ({_ext_error}); the 'cpu' and 'cuda' backends are "
            "missing and CPU tensors use the PyTorch reference. Build them with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _read_native_kernels() -> None:
    """Read which fastsearch ops the compiled extension registered kernels for."""
    global _native_kernels
    names = [name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fastsearch::")]
    _native_kernels = frozenset((name, key) for name in names for key in ("CPU", "CUDA")
                                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsearch::{name}", key))


def extension_error() -> str | None:
    return _ext_error


def has_cpu() -> bool:
    return _ext is not None


def _has_kernel(op: str, key: str) -> bool:
    """Whether the compiled extension registered ``fastsearch::op`` for dispatch key ``key`` ("CPU" / "CUDA").

    An extension built from older sources lacks the newer ops; those fall back as if it were missing.
    """
    global _native_kernels
    if _ext is None:
        return False
    if (op, key) in _native_kernels:
        return True
    # kernels loaded after import (torch.ops.load_library) register late; compiled code must not look
    if not torch.compiler.is_compiling() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsearch::{op}", key):
        _native_kernels = _native_kernels | {(op, key)}
        return True
    return False


def has_cuda() -> bool:
    return _ext is not None and bool(_ext.has_cuda())


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def has_triton(device_type: str) -> bool:
    if not _triton_importable():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and triton_interpret()


def backends() -> dict[str, bool]:
    """Which backends this process can run, by name.

    ``triton`` is reported for CUDA tensors when a GPU is present, or for CPU tensors when
    ``TRITON_INTERPRET=1`` is set.
    """
    cuda_device = torch.cuda.is_available()
    return {
        "torch": True,
        "cpu": has_cpu(),
        "cuda": has_cuda() and cuda_device,
        "triton": _triton_importable() and (cuda_device or triton_interpret()),
    }


def _unavailable(backend: str, device_type: str) -> str:
    if backend in ("cpu", "cuda") and _ext is None:
        return f"the compiled extension fastsearch._C is not loaded ({_ext_error})"
    if backend in ("cpu", "cuda") and device_type == backend and (backend == "cpu" or has_cuda()):
        return "fastsearch._C was built without this op (rebuild with `pip install --no-build-isolation -e .`)"
    if backend == "cpu":
        return "the 'cpu' backend takes CPU tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return "the 'cuda' backend takes CUDA tensors"
        return "fastsearch._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
    if not _triton_importable():
        return "triton is not installed"
    return "the 'triton' backend takes CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend that runs ``op`` on tensors of ``device``.

    ``backend="auto"`` (or the ``FASTSEARCH_BACKEND`` variable, which overrides it) picks the compiled
    CPU kernel for CPU tensors (the reference when it is missing), and for CUDA tensors the faster of
    the CUDA and Triton kernels. An explicit backend that cannot take the tensors is a ValueError.
    """
    if backend == "auto":
        backend = os.environ.get("FASTSEARCH_BACKEND", "auto")
    device_type = device.type
    if backend == "auto":
        if device_type == "cpu":
            return "cpu" if _has_kernel(op, "CPU") else "torch"
        if device_type == "cuda":
            preferred = AUTO_CUDA_PREFERENCE.get(op, "cuda")
            for candidate in (preferred, "cuda", "triton"):
                if (candidate == "cuda" and has_cuda() and _has_kernel(op, "CUDA")) or (
                        candidate == "triton" and has_triton("cuda")):
                    return candidate
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpu":
        ok = device_type == "cpu" and _has_kernel(op, "CPU")
    elif backend == "cuda":
        ok = device_type == "cuda" and has_cuda() and _has_kernel(op, "CUDA")
    elif backend == "triton":
        ok = has_triton(device_type)
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not ok:
        raise ValueError(f"backend={backend!r} cannot run {op} on {device_type} tensors: "
                         f"{_unavailable(backend, device_type)}")
    return backend
