"""PRM scoring against the full-logits path: ``make bench`` (or ``pytest benchmarks --benchmark-enable``)."""

import pytest
from harness import params, run


@pytest.mark.parametrize("case,impl", params("score"))
def test_bench(benchmark, case, impl):
    run(benchmark, case, impl)
