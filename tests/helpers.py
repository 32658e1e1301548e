"""Backends and devices to test here, and the comparison rules."""

import pytest
import torch

from fastsearch import _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backends_for(device: str) -> list[str]:
    """Every backend that can run on ``device`` in this process (the reference included)."""
    names = ["torch"]
    if device == "cpu" and _backend.has_cpu():
        names.append("cpu")
    if device == "cpu" and _backend._cuda_emulation is not None:
        names.append("cuda")  # the CUDA kernels on the host emulation of tests/cuda_emu (conftest loads it)
    if device == "cuda" and _backend.has_cuda():
        names.append("cuda")
    if _backend.has_triton(device):
        names.append("triton")
    return names


# (device, backend) pairs for every compiled or Triton backend here; the reference is the oracle.
KERNEL_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d) if b != "torch"]
ALL_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)]


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, ref_fp32: torch.Tensor | None = None,
                             atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """fp32: close to the reference. fp16/bf16: the error against the fp32-math result may be at most
    twice the rounding error of the reference itself (plus a hair), as flash-attention tests do."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32 or ref_fp32 is None:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        return
    err = (out.float() - ref_fp32).abs().max().item()
    ref_err = (ref.float() - ref_fp32).abs().max().item()
    assert err <= 2 * ref_err + atol, f"error {err} vs reference rounding error {ref_err}"
