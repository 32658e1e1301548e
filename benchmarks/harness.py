"""pytest-benchmark glue: the cases (and baselines) are those of ``fastsearch bench``, which also prints
GB/s and speed-up columns and writes the CSV."""

import pytest
import torch

from fastsearch import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (16, 4, 64, 64)


def params(*families):
    cases = [case for family in families for case in bench.FAMILIES[family](SHAPE, torch.float32, DEVICE)]
    return [pytest.param(case, impl, id=f"{case.op}[{case.case}]-{impl}") for case in cases for impl in case.impls]


def run(benchmark, case, impl):
    fn = case.impls[impl]
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # compile / warm up outside the timing
    benchmark.group = f"{case.op} {case.case} {'x'.join(map(str, case.shape))}"
    benchmark.extra_info["bytes"] = case.bytes_moved
    benchmark(timed)
