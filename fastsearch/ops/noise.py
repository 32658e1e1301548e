"""The Philox Gaussian stream (``randn``) and zero-order search neighbours (``zo_neighbors``).

The stream (see ``csrc/common/philox.h``): normal ``z_j`` under a 64-bit ``seed`` comes from Philox4x32-10
block ``j // 4`` (counter ``(lo32, hi32, 0, 0)``, key ``(lo32(seed), hi32(seed))``), lane ``j % 4``, through
``u(r) = ((r >> 8) + 0.5) 2^-24`` and Box-Muller on lane pairs (0, 1) and (2, 3).
"""

from __future__ import annotations

import math

import torch

from fastsearch.checks import FLOAT_DTYPES, check_float
from fastsearch.ops._common import Op, check_sample, int_arg, lib, tensor_arg
from fastsearch.seeding import check_offset, check_seed

_INT64_MAX = (1 << 63) - 1

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85

lib.define("randn_fill_(Tensor(a!) out, int seed, int offset) -> ()")
lib.define("zo_neighbors(Tensor pivot, int num_neighbors, float cos_sim, int seed) -> Tensor")


# -- reference ---------------------------------------------------------------------------------------


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` < 2^32.

    int64 holds no 64-bit unsigned product, so ``b`` is split in 16-bit halves.
    """
    low_part = a * (b & 0xFFFF)
    high_part = a * (b >> 16)
    partial = low_part + ((high_part & 0xFFFF) << 16)
    return ((high_part >> 16) + (partial >> 32)) & _MASK32, partial & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> torch.Tensor:
    """Ten Philox4x32 rounds on int64 tensors holding uint32 counter words, key ``(k0, k1)``: [n, 4]."""
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _box_muller(r_radius: torch.Tensor, r_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u_radius = _unit_open(r_radius)
    u_angle = _unit_open(r_angle)
    radius = torch.sqrt(-2.0 * torch.log(u_radius))
    angle = u_angle * torch.tensor(2.0 * math.pi, dtype=torch.float32)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def _stream_blocks(numel: int, seed: int, offset: int, device) -> tuple[torch.Tensor, int]:
    """The Philox blocks covering stream positions [offset, offset + numel), and where position
    ``offset`` sits in their flattened [n * 4] words."""
    first, last = offset // 4, (offset + numel + 3) // 4
    counter = torch.arange(first, last, dtype=torch.int64, device=device)
    zero = torch.zeros_like(counter)
    blocks = philox4x32_10(counter & _MASK32, (counter >> 32) & _MASK32, zero, zero, seed & _MASK32,
                           (seed >> 32) & _MASK32)
    return blocks, offset - 4 * first


def _unit_open(words: torch.Tensor) -> torch.Tensor:
    """u(r) = ((r >> 8) + 0.5) 2^-24: exact in fp32, strictly inside (0, 1)."""
    return ((words >> 8).float() + 0.5) * 2.0**-24


def randn_reference(numel: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Stream normals ``z_offset ... z_(offset + numel - 1)`` as a flat fp32 tensor (pure PyTorch)."""
    blocks, start = _stream_blocks(numel, seed, offset, device)
    z0, z1 = _box_muller(blocks[:, 0], blocks[:, 1])
    z2, z3 = _box_muller(blocks[:, 2], blocks[:, 3])
    stream = torch.stack([z0, z1, z2, z3], dim=-1).reshape(-1)
    return stream[start:start + numel]


def philox_uniforms(numel: int, seed: int, device=None, offset: int = 0) -> torch.Tensor:
    """Uniforms in (0, 1) of the same Philox blocks: position j is ``u(word j % 4 of block j // 4)``."""
    blocks, start = _stream_blocks(numel, seed, offset, device)
    return _unit_open(blocks.reshape(-1))[start:start + numel]


def _randn_fill_reference(out: torch.Tensor, seed: int, offset: int) -> None:
    out.copy_(randn_reference(out.numel(), seed, offset, out.device).view(out.shape))


def _zo_neighbors_reference(pivot: torch.Tensor, num_neighbors: int, cos_sim: float, seed: int) -> torch.Tensor:
    batch = pivot.shape[0]
    if pivot.numel() == 0:  # no pivot, or pivots of no elements: nothing to draw
        return pivot.new_empty((batch, num_neighbors) + tuple(pivot.shape[1:]))
    x = pivot.float().reshape(batch, 1, -1)
    dim = x.shape[-1]
    g = randn_reference(batch * num_neighbors * dim, seed, 0, pivot.device).view(batch, num_neighbors, dim)
    xx = (x * x).sum(-1, keepdim=True)
    gx = (g * x).sum(-1, keepdim=True)
    gg = (g * g).sum(-1, keepdim=True)
    nonzero = xx != 0  # a zero pivot has zero neighbours; NaN in a pivot makes all its neighbours NaN
    safe_xx = torch.where(nonzero, xx, torch.ones_like(xx))
    orth_norm = torch.sqrt(torch.clamp(gg - gx * gx / safe_xx, min=1e-30))
    beta = math.sqrt(max(1.0 - cos_sim * cos_sim, 0.0)) * torch.sqrt(xx) / orth_norm
    alpha = cos_sim - beta * gx / safe_xx
    out = torch.where(nonzero, alpha * x + beta * g, torch.zeros_like(g))
    return out.reshape((batch, num_neighbors) + tuple(pivot.shape[1:])).to(pivot.dtype)


# -- checks ------------------------------------------------------------------------------------------


def _check_randn_fill(out: torch.Tensor, seed: int, offset: int) -> None:
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    check_seed(seed)
    check_offset(offset, out.numel())


def _check_zo_neighbors(pivot: torch.Tensor, num_neighbors: int, cos_sim: float, seed: int) -> None:
    check_sample(pivot, "pivot")
    if pivot.numel() and pivot.numel() // pivot.shape[0] < 2:
        raise ValueError(f"pivot needs at least 2 elements per sample (a direction orthogonal to it), got shape "
                         f"{list(pivot.shape)}")
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors must be at least 1, got {num_neighbors}")
    if not -1.0 <= cos_sim <= 1.0:
        raise ValueError(f"cos_sim must be in [-1, 1], got {cos_sim}")


# -- Triton ops and fakes ------------------------------------------------------------------------------


@torch.library.custom_op("fastsearch::randn_fill_triton_", mutates_args=("out",))
def _randn_fill_triton(out: torch.Tensor, seed: int, offset: int) -> None:
    from fastsearch.kernels import noise as kernels

    kernels.randn_fill_(out, seed, offset)


@torch.library.custom_op("fastsearch::zo_neighbors_triton", mutates_args=())
def _zo_neighbors_triton(pivot: torch.Tensor, num_neighbors: int, cos_sim: float, seed: int) -> torch.Tensor:
    from fastsearch.kernels import noise as kernels

    return kernels.zo_neighbors(pivot, num_neighbors, cos_sim, seed)


def _randn_fill_fake(out, seed, offset):
    return None


def _zo_neighbors_fake(pivot, num_neighbors, cos_sim, seed):
    return pivot.new_empty((pivot.shape[0], num_neighbors) + tuple(pivot.shape[1:]))


RANDN_FILL = Op("randn_fill_", _randn_fill_triton, _check_randn_fill, _randn_fill_reference, _randn_fill_fake)
ZO_NEIGHBORS = Op("zo_neighbors", _zo_neighbors_triton, _check_zo_neighbors, _zo_neighbors_reference,
                  _zo_neighbors_fake)


# -- public functions ----------------------------------------------------------------------------------


def randn(shape, *, seed: int, offset: int = 0, device=None, dtype: torch.dtype | None = None,
          out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Standard normal samples from fastsearch's counter-based Philox stream.

    The same ``(seed, offset)`` gives the same numbers (to 1e-5) on every backend and device, and they
    are the numbers the step kernels draw in-kernel when given ``seed=``: for a sample of shape ``S``,
    ``ddim_step(..., seed=s)`` equals ``ddim_step(..., noise=randn(S, seed=s))``.

    Args:
        shape: output shape (a sequence of ints or ``torch.Size``; an int is 1-d, ``()`` gives a 0-d tensor).
        seed: int in [0, 2**63): the stream's key.
        offset: index of the first normal in the stream (element ``i`` is normal ``offset + i``); the stream
            has 2**63 normals, so ``0 <= offset`` and ``offset + numel <= 2**63`` (ValueError otherwise).
        device, dtype: of the output (float32, float16 or bfloat16; float32 by default).
        out: optional contiguous tensor of ``shape`` to fill instead of allocating (``device`` and ``dtype``,
            when given, must be its own).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        Tensor of ``shape`` (``out`` when given).

    Example:
        >>> a = fastsearch.randn((2, 3), seed=7)
        >>> b = fastsearch.randn((6,), seed=7)
        >>> torch.equal(a.flatten(), b)
        True
    """
    seed = check_seed(seed)
    if out is None:
        shape, numel = _shape_arg(shape)
        offset = check_offset(offset, numel)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(shape, dtype=dtype, device=_device_arg(device))
    else:
        _check_randn_out(out, shape, device, dtype)
        offset = check_offset(offset, out.numel())
    RANDN_FILL.run(backend, out.device, out, seed, offset)
    return out


def _shape_arg(shape) -> tuple[tuple[int, ...], int]:
    """randn's shape as a tuple of ints (an int is a 1-d shape; ``()`` a 0-d tensor), and its element count."""
    if isinstance(shape, torch.Tensor) and shape.dim() == 0:
        if shape.is_floating_point() or shape.is_complex() or shape.dtype == torch.bool:
            raise TypeError(f"shape must be an int or a sequence of ints, got a 0-d {shape.dtype} tensor")
        shape = int(shape)
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    sizes = []
    for size in shape:
        if isinstance(size, torch.Tensor):
            if size.dim() != 0 or size.is_floating_point() or size.is_complex() or size.dtype == torch.bool:
                raise TypeError(f"shape must be a sequence of ints, got an element that is a {size.dtype} tensor of "
                                f"shape {list(size.shape)}")
            size = int(size)
        if isinstance(size, bool) or not hasattr(size, "__index__"):
            raise TypeError(f"shape must be a sequence of ints, got an element of type {type(size).__name__}")
        sizes.append(size.__index__())
    if any(size < 0 for size in sizes):
        raise ValueError(f"shape must hold sizes >= 0, got {sizes}")
    numel = math.prod(sizes)
    if numel > _INT64_MAX:
        raise ValueError(f"shape {sizes} has {numel} elements, more than an int64 counts (2**63 - 1)")
    return tuple(sizes), numel


def _device_arg(device) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device, got {device!r} ({exc})") from None
    if device.type == "meta":
        raise ValueError("device is meta: randn writes numbers, and a meta tensor holds none")
    return device


def _check_randn_out(out, shape, device, dtype) -> None:
    """``out`` of randn must agree with the shape, device and dtype asked for; randn_fill_ checks the rest."""
    tensor_arg("out", out)
    expected = torch.Size(_shape_arg(shape)[0])
    if out.shape != expected:
        raise ValueError(f"out has shape {list(out.shape)} but shape is {list(expected)}")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but dtype is {dtype}")
    if device is not None:
        device = torch.device(device)
        if device.type != out.device.type or device.index not in (None, out.device.index):
            raise ValueError(f"out is on {out.device} but device is {device}")


def zo_neighbors(pivot: torch.Tensor, num_neighbors: int, *, cos_sim: float = 0.95, seed: int,
                 backend: str = "auto") -> torch.Tensor:
    """Zero-order search neighbours of each pivot: same norm, cosine ``cos_sim`` with the pivot.

    For pivot ``x`` (one sample, flattened) with ``u = x / |x|`` and ``w`` a random unit vector orthogonal
    to ``u`` (a stream Gaussian with its ``u`` component removed), a neighbour is
    ``|x| (cos_sim u + sqrt(1 - cos_sim^2) w)``. A zero pivot has zero neighbours.

    Args:
        pivot: [B, ...] float32 / float16 / bfloat16.
        num_neighbors: K >= 1 neighbours per pivot.
        cos_sim: cosine similarity with the pivot, in [-1, 1].
        seed: int; the Gaussians are ``randn([B, K, numel / B], seed=seed)``.

    Returns:
        [B, K, ...] with the pivot's dtype.

    Example:
        >>> x = torch.randn(4, 3, 8, 8)
        >>> nbrs = fastsearch.zo_neighbors(x, 5, seed=0)   # [4, 5, 3, 8, 8]
    """
    num_neighbors = int_arg("num_neighbors", num_neighbors)
    device = tensor_arg("pivot", pivot).device
    seed = check_seed(seed)
    cos_sim = check_float("cos_sim", cos_sim, low=-1.0, high=1.0)
    if num_neighbors > _INT64_MAX or pivot.numel() * max(num_neighbors, 0) > _INT64_MAX:
        raise ValueError(f"num_neighbors={num_neighbors} neighbours of a pivot of shape {list(pivot.shape)} are more "
                         "elements than an int64 counts (2**63 - 1)")
    return ZO_NEIGHBORS.run(backend, device, pivot, num_neighbors, cos_sim, seed)
