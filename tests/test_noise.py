"""The Philox stream (known answers, equal on every backend, standard normal) and zo_neighbors."""

import math

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_matches_reference

import fastsearch
from fastsearch import _backend
from fastsearch.ops.noise import philox4x32_10

# Known-answer vectors of Philox4x32-10 published with Random123: (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = philox4x32_10(*words, *key)[0].tolist()
    assert out == list(expected)


def _plain_philox(counter: int, seed: int) -> list[int]:
    """Philox4x32-10 in plain Python integers, for counter (lo32, hi32, 0, 0)."""
    mask = 0xFFFFFFFF
    c = [counter & mask, counter >> 32, 0, 0]
    k = [seed & mask, seed >> 32]
    for _ in range(10):
        p_b, p_a = 0xCD9E8D57 * c[2], 0xD2511F53 * c[0]
        c = [(p_b >> 32) ^ c[1] ^ k[0], p_b & mask, (p_a >> 32) ^ c[3] ^ k[1], p_a & mask]
        k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
    return c


@pytest.mark.skipif(not _backend.has_triton("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="no Triton backend here")
def test_triton_randint4x_is_plain_philox():
    import triton
    import triton.language as tl

    @triton.jit
    def blocks(out_ptr, seed, first, BLOCK: tl.constexpr):
        counter = first + tl.arange(0, BLOCK).to(tl.int64)
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        index = tl.arange(0, BLOCK) * 4
        tl.store(out_ptr + index, r0.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
        tl.store(out_ptr + index + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + index + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + index + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed, first = 0x1234_5678_9ABC, (1 << 32) - 3  # crosses into the high counter word
    out = torch.empty(16 * 4, dtype=torch.int64, device=device)
    blocks[(1,)](out, seed, first, BLOCK=16)
    expected = [word for i in range(16) for word in _plain_philox(first + i, seed)]
    assert out.cpu().tolist() == expected


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,offset", [((1000,), 0), ((3, 17, 19), 5), ((2, 4, 33, 7), 2**32 * 4 - 6), ((1,), 3)])
def test_randn_equal_across_backends(device, backend, dtype, shape, offset):
    seed = 2**40 + 77
    out = fastsearch.randn(shape, seed=seed, offset=offset, device=device, dtype=dtype, backend=backend)
    ref = fastsearch.randn(shape, seed=seed, offset=offset, device=device, dtype=dtype, backend="torch")
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert_matches_reference(out, ref, atol=1e-5, rtol=0)


def test_randn_offset_and_shape_index_one_stream():
    full = fastsearch.randn((64,), seed=3, backend="torch")
    torch.testing.assert_close(fastsearch.randn((8, 5), seed=3, offset=7, backend="torch").flatten(), full[7:47])
    assert not torch.equal(full, fastsearch.randn((64,), seed=4, backend="torch"))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_randn_is_standard_normal(device, backend):
    n = 1 << 18 if backend != "triton" or device == "cuda" else 1 << 16
    z = fastsearch.randn((n,), seed=123, device=device, backend=backend).double().cpu()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance to the normal CDF; 1.95 / sqrt(n) is the 0.1% critical value.
    sorted_z = torch.sort(z).values
    cdf = torch.special.ndtr(sorted_z)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ranks - cdf).abs(), (ranks - 1 / n - cdf).abs()).max().item()
    assert ks < 1.95 / math.sqrt(n)
    # Neighbours (the two normals of one Box-Muller pair, and consecutive blocks) are uncorrelated.
    for lag in (1, 2, 4):
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 17, 19), (2, 5), (5, 2, 3)], ids=str)
@pytest.mark.parametrize("cos_sim", [0.95, 0.0, -0.5])
def test_zo_neighbors_norm_and_cosine(device, backend, dtype, shape, cos_sim):
    g = torch.Generator().manual_seed(0)
    pivot = torch.randn(shape, generator=g).to(dtype).to(device)
    pivot[0] = 0  # a zero pivot has zero neighbours
    out = fastsearch.zo_neighbors(pivot, 6, cos_sim=cos_sim, seed=17, backend=backend)
    assert out.shape == (shape[0], 6) + shape[1:] and out.dtype == dtype
    if backend != "torch":
        ref = fastsearch.zo_neighbors(pivot, 6, cos_sim=cos_sim, seed=17, backend="torch")
        ref32 = fastsearch.zo_neighbors(pivot.float(), 6, cos_sim=cos_sim, seed=17, backend="torch")
        assert_matches_reference(out, ref, ref32, atol=1e-4, rtol=1e-4)
    x = pivot.float().reshape(shape[0], 1, -1)
    y = out.float().reshape(shape[0], 6, -1)
    assert torch.all(y[0] == 0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    norm_x, norm_y = x.norm(dim=-1), y.norm(dim=-1)
    torch.testing.assert_close(norm_y[1:], norm_x[1:].expand_as(norm_y[1:]), atol=tol * 4, rtol=tol)
    cosine = (x * y).sum(-1)[1:] / (norm_x[1:] * norm_y[1:])
    torch.testing.assert_close(cosine, torch.full_like(cosine, cos_sim), atol=tol, rtol=0)
    # Different neighbours of one pivot differ.
    assert not torch.allclose(y[1:, 0], y[1:, 1])
