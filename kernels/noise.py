"""The Gaussian stream in Triton: ``randn_fill_`` and zero-order search neighbours (csrc/README.md)."""

import math

import torch
import triton
import triton.language as tl

from ._device import launches_on_tensor_device
from .philox import plan_windows, segment_window, store_window, stream_normals

# Windows per program of the zo_neighbors sums on a GPU: 8K elements of Philox work each, enough
# programs for a few neighbours of one latent to fill the machine. A constexpr trip count, so one
# compiled kernel serves every size.
ZO_GPU_WINDOWS_PER_CHUNK = 8


@triton.jit(do_not_specialize=["seed"])
def _randn_fill_kernel(out_ptr, seed: tl.int64, offset, numel, BLOCK: tl.constexpr):
    first_counter, index, mask = segment_window(offset, numel, tl.program_id(0), BLOCK)
    z = stream_normals(seed, first_counter, BLOCK)
    store_window(out_ptr, index - offset, mask, z)


@triton.jit(do_not_specialize=["seed"])
def _zo_sums_kernel(pivot_ptr, partial_ptr, seed: tl.int64, dim, num_neighbors, chunks_per_row,
                    WINDOWS_PER_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Partial x.x, g.x, g.g of neighbour row ``b K + k`` over one chunk of its windows: partial[row, chunk].

    The last chunk may run past the row's windows; those lie outside the row and are masked.
    """
    pid = tl.program_id(0)
    row = pid // chunks_per_row
    row_start = row.to(tl.int64) * dim
    pivot_start = (row // num_neighbors).to(tl.int64) * dim
    first_window = (pid % chunks_per_row) * WINDOWS_PER_CHUNK
    xx = tl.zeros([4 * BLOCK], tl.float32)
    gx = tl.zeros([4 * BLOCK], tl.float32)
    gg = tl.zeros([4 * BLOCK], tl.float32)
    for step in range(WINDOWS_PER_CHUNK):
        first_counter, index, mask = segment_window(row_start, dim, first_window + step, BLOCK)
        x = tl.load(pivot_ptr + pivot_start + (index - row_start), mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask, stream_normals(seed, first_counter, BLOCK), 0.0)
        xx += x * x
        gx += g * x
        gg += g * g
    tl.store(partial_ptr + pid * 3, tl.sum(xx))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(gx))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(gg))


@triton.jit(do_not_specialize=["seed"])
def _zo_combine_kernel(pivot_ptr, partial_ptr, out_ptr, seed: tl.int64, dim, num_neighbors, windows_per_row,
                       chunks_per_row, cos_sim, sin_sim, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """out = alpha x + beta g over one window of neighbour row ``b K + k``, from the row's summed partials."""
    pid = tl.program_id(0)
    row = pid // windows_per_row
    row_start = row.to(tl.int64) * dim
    pivot_start = (row // num_neighbors).to(tl.int64) * dim
    chunk = tl.arange(0, CHUNKS)
    partial = partial_ptr + (row * chunks_per_row + chunk) * 3
    in_row = chunk < chunks_per_row
    xx = tl.sum(tl.load(partial, mask=in_row, other=0.0))
    gx = tl.sum(tl.load(partial + 1, mask=in_row, other=0.0))
    gg = tl.sum(tl.load(partial + 2, mask=in_row, other=0.0))
    # |x| (c u + sqrt(1 - c^2) w) with w = (g - (g.u) u) / |g - (g.u) u|, written as alpha x + beta g;
    # a zero pivot gets zero neighbours.
    nonzero = xx != 0  # NaN in the pivot goes through the formula: NaN everywhere
    safe_xx = tl.where(nonzero, xx, 1.0)
    orth_norm = tl.sqrt(tl.maximum(gg - gx * gx / safe_xx, 1e-30))
    beta = tl.where(nonzero, sin_sim * tl.sqrt(xx) / orth_norm, 0.0)
    alpha = tl.where(nonzero, cos_sim - beta * gx / safe_xx, 0.0)

    first_counter, index, mask = segment_window(row_start, dim, pid % windows_per_row, BLOCK)
    x = tl.load(pivot_ptr + pivot_start + (index - row_start), mask=mask, other=0.0).to(tl.float32)
    g = stream_normals(seed, first_counter, BLOCK)
    store_window(out_ptr, index, mask, alpha * x + beta * g)


@launches_on_tensor_device
def randn_fill_(out, seed, offset):
    numel = out.numel()
    if numel == 0:
        return
    plan = plan_windows(numel, 1, out.is_cuda, start=offset)
    _randn_fill_kernel[(plan.windows,)](out, seed, offset, numel, BLOCK=plan.block, num_warps=plan.num_warps)


@launches_on_tensor_device
def zo_neighbors(pivot, num_neighbors, cos_sim, seed):
    pivot = pivot.contiguous()
    batch = pivot.shape[0]
    out = pivot.new_empty((batch, num_neighbors) + tuple(pivot.shape[1:]))
    if out.numel() == 0:
        return out
    # Row b K + k of the [B K, D] output is neighbour k of pivot b; its Gaussians are stream indices
    # [(b K + k) D, (b K + k + 1) D), which is exactly its place in the output.
    rows, dim = batch * num_neighbors, pivot.numel() // batch
    plan = plan_windows(dim, rows, pivot.is_cuda)
    windows_per_chunk = ZO_GPU_WINDOWS_PER_CHUNK if pivot.is_cuda else plan.windows
    chunks_per_row = triton.cdiv(plan.windows, windows_per_chunk)
    partial = torch.empty((rows, chunks_per_row, 3), dtype=torch.float32, device=pivot.device)
    _zo_sums_kernel[(rows * chunks_per_row,)](pivot, partial, seed, dim, num_neighbors, chunks_per_row,
                                              WINDOWS_PER_CHUNK=windows_per_chunk, BLOCK=plan.block,
                                              num_warps=plan.num_warps)
    sin_sim = math.sqrt(max(1.0 - cos_sim * cos_sim, 0.0))
    _zo_combine_kernel[(rows * plan.windows,)](pivot, partial, out, seed, dim, num_neighbors, plan.windows,
                                               chunks_per_row, float(cos_sim), sin_sim,
                                               CHUNKS=triton.next_power_of_2(chunks_per_row), BLOCK=plan.block,
                                               num_warps=plan.num_warps)
    return out
