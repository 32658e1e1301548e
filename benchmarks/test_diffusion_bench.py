"""Noise search on the Gaussian mixture (d = 64, 256 rows per step): whole-search time, with the overhead
outside the model and the verifier per NFE in ``extra_info`` (what ``fastsearch bench`` reports)."""

import pytest
import torch

from fastsearch.bench import diffusion as diffusion_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = diffusion_benchmark.cases(DEVICE)


@pytest.mark.parametrize("name", list(CASES))
def test_bench(benchmark, name):
    run = CASES[name]
    model, verifier = diffusion_benchmark.problem(DEVICE)
    overhead = diffusion_benchmark.overhead_per_nfe(run, DEVICE)  # also warms up
    benchmark.group = f"{name} gmm d={diffusion_benchmark.DIM} B={diffusion_benchmark.ROWS}"
    benchmark.extra_info["overhead_us_per_nfe"] = overhead * 1e6
    result = benchmark(run, model, verifier)
    assert result.total_nfe > 0
