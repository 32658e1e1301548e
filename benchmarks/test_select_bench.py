"""Beam pruning and resampling: ``make bench`` (or ``pytest benchmarks --benchmark-enable``)."""

import pytest
from harness import params, run


@pytest.mark.parametrize("case,impl", params("select"))
def test_bench(benchmark, case, impl):
    run(benchmark, case, impl)
