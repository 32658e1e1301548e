"""Timing helpers shared by the benchmark families: a case, medians, the largest allocation, backends."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as torch_benchmark

from fastsearch import _backend


@dataclass
class Case:
    op: str
    case: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes_moved: int
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    measure_memory: bool = False  # also record the largest single allocation of each implementation


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def median_us(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # warm up (compiles, caches)
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def largest_allocation_mb(fn: Callable[[], object], device: torch.device) -> float:
    """The largest block one call allocates, in MiB: the CUDA allocator's peak above the memory in use
    before the call, or on the CPU the largest allocation the torch profiler's memory view records."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([event.cpu_memory_usage for event in prof.events()] + [0]) / 2**20


def fastsearch_backends(device: torch.device, op: str | None = None) -> list[str]:
    """The compiled and Triton backends that can run ``op`` (any op, when None) on ``device`` here."""
    names = []
    if device.type == "cpu":
        if _backend.has_cpu() and (op is None or _backend._has_kernel(op, "CPU")):
            names.append("cpu")
    else:
        if _backend.has_cuda() and (op is None or _backend._has_kernel(op, "CUDA")):
            names.append("cuda")
        if _backend.has_triton("cuda"):
            names.append("triton")
    return names


def compile_or_none(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - a baseline that cannot compile is left out, not fatal
        return None
