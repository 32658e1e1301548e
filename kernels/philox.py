"""fastsearch's Gaussian stream in Triton, and the counter-aligned windows kernels walk it in.

Normal ``z_j`` under a 64-bit seed is lane ``j % 4`` of Philox4x32-10 block ``j // 4`` (counter
``(lo32, hi32, 0, 0)``, key ``(lo32(seed), hi32(seed))``), through ``u(r) = ((r >> 8) + 0.5) 2^-24`` and
Box-Muller on lane pairs (0, 1) and (2, 3): the stream of ``csrc/common/philox.h``.

A kernel that draws normals covers its elements in windows of ``4 * BLOCK`` stream indices that start on
a counter block, so one ``stream_normals`` call (one Philox block per four elements) serves a window.
A segment (a sample, a neighbour, a ``randn`` request) may start anywhere: its windows are aligned to
the global window grid and mask what lies outside the segment.
"""

import math
from typing import NamedTuple

import triton
import triton.language as tl

# A GPU program takes 256 elements per warp (8 per thread: two counter blocks, two 16-byte fp32 vectors)
# and up to 4 warps, the usual shape for a memory-bound element-wise kernel.
GPU_WINDOW_MAX = 1024
GPU_WINDOW_MIN = 256
GPU_ELEMENTS_PER_WARP = 256
# The interpreter pays per program and per op, not per element: whole samples in as few programs as possible.
INTERPRETER_WINDOW_MAX = 65536
INTERPRETER_WINDOW_MIN = 64


@triton.jit
def _unit_open(r):
    # The top 24 bits and half a step: exact in fp32, never 0 or 1, so the log below stays finite.
    return ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _box_muller(r_radius, r_angle):
    # sqrt_rn: correctly rounded, as on the other backends (tl.sqrt compiles to sqrt.approx on a GPU).
    radius = tl.sqrt_rn(-2.0 * tl.log(_unit_open(r_radius)))
    angle = _unit_open(r_angle) * 6.283185307179586
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def stream_normals(seed, first_counter, BLOCK: tl.constexpr):
    """Normals ``z_(4 first_counter) ... z_(4 (first_counter + BLOCK) - 1)`` in stream order: [4 BLOCK] fp32.

    ``first_counter`` is int64, so ``randint4x`` puts its high word in the second counter word.
    """
    counter = first_counter + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    # (z0, z2, z0', z2', ...) and (z1, z3, ...) interleave to z0, z1, z2, z3 of each block in turn.
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def segment_window(segment_start, segment_len, window, BLOCK: tl.constexpr):
    """Window ``window`` of the segment ``[segment_start, segment_start + segment_len)`` of the stream.

    Returns its first counter block (int64), its ``4 BLOCK`` stream indices (int64) and which of them lie
    in the segment.
    """
    # A counter is a quarter of its stream index, so it fits in int32 wherever the start does.
    first_counter = ((segment_start // (4 * BLOCK) + window) * BLOCK).to(tl.int64)
    index = first_counter * 4 + tl.arange(0, 4 * BLOCK)
    # Compared as index - start so that an int32 start near 2**31 cannot overflow.
    mask = (index >= segment_start) & (index - segment_start < segment_len)
    return first_counter, index, mask


class WindowPlan(NamedTuple):
    block: int  # counter blocks per window; a window is 4 * block elements
    windows: int  # windows that cover any one segment
    num_warps: int


def plan_windows(segment_len: int, segments: int, on_gpu: bool, start: int = 0) -> WindowPlan:
    """Windows for ``segments`` segments of ``segment_len`` stream indices, segment ``s`` starting at
    ``start + s * segment_len`` (``start`` only with one segment).
    """
    if on_gpu:
        window = min(GPU_WINDOW_MAX, max(GPU_WINDOW_MIN, triton.next_power_of_2(segment_len)))
        num_warps = window // GPU_ELEMENTS_PER_WARP
    else:
        window = min(INTERPRETER_WINDOW_MAX, max(INTERPRETER_WINDOW_MIN, triton.next_power_of_2(segment_len)))
        num_warps = 1
    # How far past a window boundary a segment can start: its windows are the ones it overlaps.
    if segments == 1:
        residue = start % window
    else:
        residue = window - math.gcd(segment_len, window)
    return WindowPlan(window // 4, (residue + segment_len - 1) // window + 1, num_warps)


@triton.jit
def store_window(ptr, offsets, mask, value):
    """Store fp32 ``value`` in ``ptr``'s dtype, rounded to nearest even.

    bfloat16 is rounded by hand: the interpreter truncates fp32 to bf16 where a GPU's conversion rounds to
    nearest even, and the bit trick below gives the GPU's result on both.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # The carry would turn some NaN payloads into zeros or infinities.
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(ptr + offsets, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)
