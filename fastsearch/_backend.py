"""Which backends exist in this process, and which one runs a given call.

Backends:
  ``torch``   the pure-PyTorch reference (any device; the oracle and the fallback)
  ``cpu``     C++ kernels in ``fastsearch._C_cpu_<capability>`` (CPU tensors)
  ``cuda``    CUDA kernels in ``fastsearch._C`` (CUDA tensors; only in a CUDA build)
  ``triton``  Triton kernels (CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1``)

The CPU kernels are built once per instruction set (``default``, ``avx2``, ``avx512``; setup.py). One
process loads one of those modules: the best this CPU runs (``fastsearch._C`` asks cpuid), or the one the
``FASTSEARCH_CPU_CAPABILITY`` variable names.

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

# The CPU kernel builds, weakest first; each runs on a CPU that supports it (fastsearch._C says which do).
CPU_CAPABILITIES = ("default", "avx2", "avx512")
CPU_CAPABILITY_VARIABLE = "FASTSEARCH_CPU_CAPABILITY"

_ext = None  # fastsearch._C
_ext_error: str | None = None
_cpu_ext = None  # fastsearch._C_cpu_<capability>
_cpu_error: str | None = None
# (op, dispatch key) pairs the compiled extension registered; a plain set so torch.compile can read it.
_native_kernels: frozenset[tuple[str, str]] = frozenset()

# For CUDA tensors ``auto`` takes the faster compiled backend per op, as measured by
# ``fastsearch bench`` on an H100 / H200 (benchmarks/results/). Ops not listed (nothing measured
# yet) prefer the CUDA C++ kernels, then Triton.
AUTO_CUDA_PREFERENCE: dict[str, str] = {}

# The CUDA kernels compiled for the host on an emulation of the CUDA execution model (tests/cuda_emu, a test
# tool, not a backend): the test suite sets this to the ``torch.ops`` namespace that tool registers, and
# ``backend="cuda"`` on CPU tensors then runs the emulated kernels (``resolve`` answers "cuda_emulated").
# The library itself never sets it.
_cuda_emulation = None


def emulated(name: str) -> torch._ops.OpOverload:
    """The emulated CUDA kernel of the op overload ``name`` ("ddim_step", "ddim_step.out"), while the test tool
    is loaded."""
    base, _, overload = name.partition(".")
    return getattr(getattr(_cuda_emulation, base), overload or "default")


def load_extension() -> None:
    """Import ``fastsearch._C`` and one CPU kernel module once; on failure remember why and say so once."""
    global _ext, _ext_error
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
            _load_cpu_kernels()
            _read_native_kernels()
    if _ext is None:
        warnings.warn(
            f"fastsearch: compiled kernels unavailable ({_ext_error}); the 'cpu' and 'cuda' backends are "
            "missing and CPU tensors use the PyTorch reference. Build them with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def supported_cpu_capabilities() -> tuple[str, ...]:
    """The CPU kernel builds this CPU can run, weakest first (``()`` without ``fastsearch._C``)."""
    report = getattr(_ext, "cpu_capabilities", None)  # absent without _C, or in one built before the capabilities
    return tuple(report()) if report is not None else ()


def built_cpu_capabilities() -> tuple[str, ...]:
    """The CPU kernel builds installed with this fastsearch, weakest first."""
    return tuple(name for name in CPU_CAPABILITIES if importlib.util.find_spec(f"fastsearch._C_cpu_{name}"))


def _choose_cpu_capability() -> str | None:
    """The best build this CPU runs, or the one FASTSEARCH_CPU_CAPABILITY forces when the CPU runs it."""
    supported, built = supported_cpu_capabilities(), built_cpu_capabilities()
    usable = [name for name in built if name in supported]
    best = usable[-1] if usable else None
    requested = os.environ.get(CPU_CAPABILITY_VARIABLE, "").strip().lower()
    if not requested or requested == best:
        return best
    if requested not in CPU_CAPABILITIES:
        problem = f"is not one of {', '.join(CPU_CAPABILITIES)}"
    elif requested not in supported:
        # Importing it would die on the first instruction the CPU lacks (SIGILL).
        problem = f"needs instructions this CPU lacks (it runs {', '.join(supported)})"
    elif requested not in built:
        problem = (f"was not built (this install has {', '.join(built) or 'none'}; "
                   "see FASTSEARCH_CPU_CAPABILITIES in setup.py)")
    else:
        return requested
    warnings.warn(f"fastsearch: {CPU_CAPABILITY_VARIABLE}={os.environ[CPU_CAPABILITY_VARIABLE]!r} {problem}; "
                  f"using the {best or 'PyTorch reference'} CPU kernels instead",
                  RuntimeWarning, stacklevel=5)
    return best


def _load_cpu_kernels() -> None:
    """Import the chosen CPU kernel module, which registers the ``fastsearch::`` CPU kernels."""
    global _cpu_ext, _cpu_error
    capability = _choose_cpu_capability()
    if capability is None:
        _cpu_error = (f"no CPU kernel build this CPU runs (built: {', '.join(built_cpu_capabilities()) or 'none'}; "
                      f"this CPU runs: {', '.join(supported_cpu_capabilities())})")
        warnings.warn(f"fastsearch: {_cpu_error}; CPU tensors use the PyTorch reference", RuntimeWarning,
                      stacklevel=4)
        return
    try:
        _cpu_ext = importlib.import_module(f"fastsearch._C_cpu_{capability}")
    except ImportError as exc:
        _cpu_error = str(exc)
        warnings.warn(f"fastsearch: the {capability} CPU kernels did not load ({exc}); CPU tensors use the PyTorch "
                      "reference", RuntimeWarning, stacklevel=4)


def cpu_capability() -> str | None:
    """The instruction set of the CPU kernels in use (``default``, ``avx2``, ``avx512``), or None without them."""
    return _cpu_ext.capability if _cpu_ext is not None else None


def _read_native_kernels() -> None:
    """Read which fastsearch ops the compiled extension registered kernels for."""
    global _native_kernels
    names = [name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fastsearch::")]
    _native_kernels = frozenset((name, key) for name in names for key in ("CPU", "CUDA")
                                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsearch::{name}", key))


def extension_error() -> str | None:
    """Why the compiled extension, or its CPU kernels, did not load; None when they did."""
    return _ext_error or _cpu_error


def has_cpu() -> bool:
    return _cpu_ext is not None


def _has_kernel(op: str, key: str) -> bool:
    """Whether the compiled extension registered ``fastsearch::op`` for dispatch key ``key`` ("CPU" / "CUDA").

    An extension built from older sources lacks the newer ops; those fall back as if it were missing.
    """
    global _native_kernels
    if _ext is None or (key == "CPU" and _cpu_ext is None):
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
    if backend == "cpu" and _cpu_ext is None:
        return f"the compiled CPU kernels are not loaded ({_cpu_error})"
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
        if device_type == "cpu" and _cuda_emulation is not None:
            return "cuda_emulated"
        ok = device_type == "cuda" and has_cuda() and _has_kernel(op, "CUDA")
    elif backend == "triton":
        ok = has_triton(device_type)
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not ok:
        raise ValueError(f"backend={backend!r} cannot run {op} on {device_type} tensors: "
                         f"{_unavailable(backend, device_type)}")
    return backend
