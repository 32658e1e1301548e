"""pytest-benchmark suite for the step and noise ops: ``make bench`` (or ``pytest benchmarks --benchmark-enable``).

The cases (and baselines: diffusers' scheduler step, eager PyTorch, torch.compile) are those of
``fastsearch bench``, which also prints GB/s and the speed-up columns and writes the CSV.
"""

import pytest
import torch

from fastsearch import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (16, 4, 64, 64)
CASES = [case for family in bench.FAMILIES.values() for case in family(SHAPE, torch.float32, DEVICE)]
PARAMS = [pytest.param(case, impl, id=f"{case.op}[{case.case}]-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_bench(benchmark, case, impl):
    fn = case.impls[impl]
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # compile / warm up outside the timing
    benchmark.group = f"{case.op} {case.case} {'x'.join(map(str, SHAPE))}"
    benchmark.extra_info["bytes"] = case.bytes_moved
    benchmark(timed)
