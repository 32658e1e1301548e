"""LLM searches on the simulated reasoning task: ``pytest benchmarks/test_search_bench.py --benchmark-enable``.

The same cases as ``fastsearch.bench.llm`` (``fastsearch bench``): whole searches at 64 problems x
n = 16 and 256 x 64. ``extra_info`` carries fastsearch's overhead (wall time outside the generator and the
verifier) per beam and step, and for the runs with a costed generator the split of the wall time.
"""

import statistics

import pytest

from fastsearch.bench import llm as search_benchmark
from fastsearch.models import reasoning

CASES = [pytest.param(name, groups, n, id=f"{name}-{groups}x{n}")
         for groups, n in search_benchmark.SHAPES for name in search_benchmark.ALGORITHMS]


def _time(benchmark, name, groups, n, generator, group):
    texts = [p.text for p in reasoning.make_problems(groups, seed=0)]
    prm = reasoning.SimulatedPRM()
    search = search_benchmark.ALGORITHMS[name]
    spent = []

    def run():
        spent.append(search(texts, generator, prm, n, len(spent)).spent)

    benchmark.group = group
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["overhead_per_beam_step_us"] = statistics.median(
        s.overhead_seconds / s.sequences * 1e6 for s in spent)
    benchmark.extra_info["overhead_per_step_us"] = statistics.median(
        s.overhead_seconds / s.generator_calls * 1e6 for s in spent)
    for part in ("generator_seconds", "verifier_seconds", "overhead_seconds"):
        benchmark.extra_info[part] = statistics.median(getattr(s, part) for s in spent)
    return spent


@pytest.mark.parametrize("name,groups,n", CASES)
def test_search_overhead(benchmark, name, groups, n):
    spent = _time(benchmark, name, groups, n, reasoning.SimulatedGenerator(), f"search {groups}x{n}, free generator")
    assert all(s.sequences > 0 for s in spent)


@pytest.mark.parametrize("name", ["best_of_n", "beam_search"])
@pytest.mark.parametrize("groups,n", search_benchmark.SHAPES)
def test_search_wall_with_generator_cost(benchmark, name, groups, n):
    generator = reasoning.SimulatedGenerator(cost_per_call=search_benchmark.CALL_COST,
                                             cost_per_token=search_benchmark.TOKEN_COST)
    spent = _time(benchmark, name, groups, n, generator, f"search {groups}x{n}, costed generator")
    assert all(s.generator_seconds > 0 for s in spent)
