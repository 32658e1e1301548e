"""Timings of the LLM searches on the simulated reasoning task (``fastsearch bench`` rows).

Two measurements, at 64 problems x n = 16 and 256 problems x n = 64 (beam width 4):

- fastsearch's overhead: a search's wall time outside the generator and verifier calls (bookkeeping and
  selection), per beam and step (``overhead_per_beam_step_us``) and per step (``overhead_per_step_us``),
  with the simulation costing nothing but its own compute; and the same in CPU time of the searching thread
  (``overhead_cpu_per_beam_step_us``), which other processes on a shared machine disturb less.
- beam search's wall time against best-of-N's at the same n when the generator costs
  ``CALL_COST + TOKEN_COST * tokens`` per call (the realistic 400-tokens-per-call ratio of
  :class:`~fastsearch.models.reasoning.SimulatedGenerator`, scaled down 100 times):
  ``wall_ratio_vs_bon`` for fastsearch's batched beam search and ``one_problem_at_a_time_wall_ratio_vs_bon``
  for the same beam search run problem by problem, as the reference implementation runs it.
- sequential revisions' overhead per chain and round (``overhead_per_chain_round_us``: wall time outside the
  generator and verifier over the G x n attempts; ``overhead_cpu_per_chain_round_us``: the same in CPU time of
  the searching thread), with a generator and an outcome verifier that cost
  nothing (they hand out ready-made attempts and scores), at chain lengths 4 and n, for verifier-weighted
  selection and for verifier-free majority selection; the target is under 2 us at 256 x 64.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from itertools import cycle, islice

import numpy as np
import torch

from fastsearch.models import reasoning
from fastsearch.search.algorithms import beam_search, best_of_n, dvts, particle_filter
from fastsearch.search.revisions import revisions
from fastsearch.search.types import CompletionBatch, SearchResult

SHAPES = ((64, 16), (256, 64))
BEAM_WIDTH = 4
MAX_STEPS = reasoning.MAX_STEPS + 2
CALL_COST, TOKEN_COST = 2e-4, 5e-7
_WARMUP_SEED = 2**32
_SIM = {"vote": "weighted", "answer_fn": reasoning.extract_answer}
ALGORITHMS: dict[str, Callable[..., SearchResult]] = {
    "best_of_n": lambda problems, g, v, n, seed: best_of_n(problems, g, v, n=n, seed=seed, **_SIM),
    "beam_search": lambda problems, g, v, n, seed: beam_search(problems, g, v, n=n, beam_width=BEAM_WIDTH,
                                                               max_steps=MAX_STEPS, seed=seed, **_SIM),
    "dvts": lambda problems, g, v, n, seed: dvts(problems, g, v, n=n, beam_width=BEAM_WIDTH, max_steps=MAX_STEPS,
                                                 seed=seed, **_SIM),
    "particle_filter": lambda problems, g, v, n, seed: particle_filter(problems, g, v, n=n, max_steps=MAX_STEPS,
                                                                       seed=seed, **_SIM),
}


REVISION_CASES = (("verifier", 4), ("majority", 4), ("verifier", None))  # (select, chain length; None: n)


class FreeGenerator:
    """Hands out ready-made attempts (97 distinct texts, 7 answers) in turn: a generator that costs nothing."""

    def __init__(self):
        self.pool = [f"step one {k}\n\nstep two {k}\n\nanswer {k % 7} <0>" for k in range(97)]

    def generate(self, prompts, *, n, **options):
        count = len(prompts) * n
        return CompletionBatch(list(islice(cycle(self.pool), count)), np.full(count, 40), np.ones(count, bool), n)


class FreeOutcomeVerifier:
    """Ready-made scores: an outcome verifier that costs nothing."""

    def __init__(self):
        self.scores = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0))

    def score_completions(self, problems, completions):
        return self.scores[:len(completions)]


def revision_overhead_us(groups: int, n: int, select: str, chain_length: int, min_run_time: float
                         ) -> tuple[float, float]:
    """Median overhead of :func:`revisions` per chain and round (per attempt), in microseconds: ``(wall, cpu)``,
    wall time outside the generator and verifier calls, and the same in CPU time of the searching thread."""
    texts = [p.text for p in reasoning.make_problems(groups, seed=0)]
    generator, verifier = _CpuTimed(FreeGenerator()), FreeOutcomeVerifier() if select == "verifier" else None
    cpu = []

    def run(seed: int) -> SearchResult:
        generator.cpu_seconds = 0.0
        began = time.thread_time()
        result = revisions(texts, generator, verifier, n=n, chain_length=chain_length, select=select, seed=seed,
                           answer_fn=reasoning.extract_answer)
        cpu.append((time.thread_time() - began - generator.cpu_seconds) / (groups * n) * 1e6)
        return result

    walls = [r.spent.overhead_seconds / (groups * n) * 1e6 for r in _repeat(run, min_run_time, 5)]
    return statistics.median(walls), statistics.median(cpu[1:])  # cpu[0]: the warm-up run


def _repeat(run: Callable[[int], SearchResult], min_run_time: float, at_least: int) -> list[SearchResult]:
    """Results of ``run(seed)`` for seeds 0, 1, ... until ``min_run_time`` seconds and ``at_least`` runs,
    after one run to warm up (first calls of the ops, caches)."""
    run(_WARMUP_SEED)
    results, began = [], time.perf_counter()
    while len(results) < at_least or time.perf_counter() - began < min_run_time:
        results.append(run(len(results)))
    return results


class _CpuTimed:
    """A generator or verifier that adds up the CPU time its caller's thread spends inside it."""

    def __init__(self, inner):
        self.inner = inner
        self.cpu_seconds = 0.0

    def generate(self, prompts, **options):
        began = time.thread_time()
        try:
            return self.inner.generate(prompts, **options)
        finally:
            self.cpu_seconds += time.thread_time() - began

    def score(self, problems, step_lists):
        began = time.thread_time()
        try:
            return self.inner.score(problems, step_lists)
        finally:
            self.cpu_seconds += time.thread_time() - began


def _overhead_cpu(search: Callable[..., SearchResult], texts: list[str], n: int, seed: int) -> float:
    """CPU seconds of the calling thread in one search outside its generator and verifier, per beam and step."""
    generator, verifier = _CpuTimed(reasoning.SimulatedGenerator()), _CpuTimed(reasoning.SimulatedPRM())
    began = time.thread_time()
    result = search(texts, generator, verifier, n, seed)
    total = time.thread_time() - began
    return (total - generator.cpu_seconds - verifier.cpu_seconds) / result.spent.sequences


def _row(op: str, case: str, shape: str, value: float) -> dict:
    return {"op": op, "case": case, "shape": shape, "dtype": "-", "impl": "fastsearch", "median_us": round(value, 3)}


def rows(min_run_time: float = 0.5) -> list[dict]:
    """Measure every case; ``median_us`` holds microseconds, or the ratio where the case says ``ratio``."""
    return [row for groups, n in SHAPES for row in _shape_rows(groups, n, min_run_time)]


def _shape_rows(groups: int, n: int, min_run_time: float) -> list[dict]:
    shape = f"{groups}x{n}"
    texts = [p.text for p in reasoning.make_problems(groups, seed=0)]
    free, costly = reasoning.SimulatedGenerator(), reasoning.SimulatedGenerator(cost_per_call=CALL_COST,
                                                                                cost_per_token=TOKEN_COST)
    prm = reasoning.SimulatedPRM()
    out = []
    for name, search in ALGORITHMS.items():
        spent = [r.spent for r in _repeat(partial(search, texts, free, prm, n), min_run_time, 5)]
        per_beam_step = statistics.median(s.overhead_seconds / s.sequences * 1e6 for s in spent)
        per_step = statistics.median(s.overhead_seconds / s.generator_calls * 1e6 for s in spent)
        out.append(_row(name, f"{shape} overhead_per_beam_step_us", shape, per_beam_step))
        out.append(_row(name, f"{shape} overhead_per_step_us", shape, per_step))
        cpu = statistics.median(_overhead_cpu(search, texts, n, seed) for seed in range(3))
        out.append(_row(name, f"{shape} overhead_cpu_per_beam_step_us", shape, cpu * 1e6))
    for select, chain_length in REVISION_CASES:
        length = n if chain_length is None else chain_length
        wall, cpu = revision_overhead_us(groups, n, select, length, min_run_time)
        setting = f"(chain_length={length}, select={select}, free generator)"
        out.append(_row("revisions", f"{shape} overhead_per_chain_round_us {setting}", shape, wall))
        out.append(_row("revisions", f"{shape} overhead_cpu_per_chain_round_us {setting}", shape, cpu))
    cost = f"generator {CALL_COST * 1e3:g} ms/call + {TOKEN_COST * 1e6:g} us/token"
    walls = {}
    for name in ("best_of_n", "beam_search"):
        runs = _repeat(partial(ALGORITHMS[name], texts, costly, prm, n), min_run_time, 3)
        walls[name] = statistics.median(r.spent.wall_seconds for r in runs)
        out.append(_row(name, f"{shape} wall_us ({cost})", shape, walls[name] * 1e6))
    beam = ALGORITHMS["beam_search"]
    one_by_one = sum(beam([text], costly, prm, n, 0).spent.wall_seconds for text in texts)
    out.append(_row("beam_search", f"{shape} wall_ratio_vs_bon (ratio; {cost})", shape,
                    walls["beam_search"] / walls["best_of_n"]))
    out.append(_row("beam_search", f"{shape} one_problem_at_a_time_wall_ratio_vs_bon (ratio; {cost})", shape,
                    one_by_one / walls["best_of_n"]))
    return out


if __name__ == "__main__":
    for row in rows():
        print(f"{row['op']:16} {row['case']:75} {row['median_us']:>14,.3f}")
