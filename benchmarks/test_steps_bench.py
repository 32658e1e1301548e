"""Sampler steps and the noise stream: ``make bench`` (or ``pytest benchmarks --benchmark-enable``)."""

import pytest
from harness import params, run


@pytest.mark.parametrize("case,impl", params("ddim_step", "flow_euler_step", "per_sample", "randn"))
def test_bench(benchmark, case, impl):
    run(benchmark, case, impl)
