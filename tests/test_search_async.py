"""Searches inside servers: the awaitable entry points, concurrent searches from tasks and threads, no
process-wide state touched, and the CompletionBatch answer of a generator."""

from __future__ import annotations

import asyncio
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from fastsearch.models import reasoning
from fastsearch.search import (
    Completion,
    CompletionBatch,
    beam_search,
    beam_search_async,
    best_of_n,
    best_of_n_async,
    dvts,
    dvts_async,
    particle_filter,
    particle_filter_async,
    revisions,
    revisions_async,
)

PROBLEMS = [p.text for p in reasoning.make_problems(6, seed=11)]
SIM = {"answer_fn": reasoning.extract_answer, "vote": "weighted"}
SEARCHES = {
    "best_of_n": (best_of_n, best_of_n_async, {"n": 8, **SIM}),
    "beam_search": (beam_search, beam_search_async, {"n": 8, "beam_width": 2, "max_steps": 12, **SIM}),
    "dvts": (dvts, dvts_async, {"n": 8, "beam_width": 4, "max_steps": 12, **SIM}),
    "particle_filter": (particle_filter, particle_filter_async, {"n": 8, "max_steps": 12, **SIM}),
    "revisions": (revisions, revisions_async, {"n": 8, "chain_length": 4, "answer_fn": reasoning.extract_answer}),
}


def same_result(a, b) -> None:
    assert a.completions == b.completions and a.candidates == b.candidates and a.answers == b.answers
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.offsets, b.offsets)
    assert torch.equal(a.scores.nan_to_num(-7.0), b.scores.nan_to_num(-7.0))
    for field in ("generated_tokens", "sequences", "generator_calls", "verifier_calls", "scored_steps"):
        assert getattr(a.spent, field) == getattr(b.spent, field), field


class AsyncGenerator:
    """The simulated generator behind an ``agenerate`` coroutine that yields to the loop; counts calls in flight."""

    def __init__(self):
        self.inner = reasoning.SimulatedGenerator()
        self.in_flight = self.most_in_flight = self.sync_calls = 0

    def generate(self, prompts, **options):
        self.sync_calls += 1
        return self.inner.generate(prompts, **options)

    async def agenerate(self, prompts, **options):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.002)
            return self.inner.generate(prompts, **options)
        finally:
            self.in_flight -= 1


class AsyncPRM:
    def __init__(self):
        self.inner = reasoning.SimulatedPRM()
        self.calls = 0

    async def ascore(self, problems, step_lists):
        self.calls += 1
        await asyncio.sleep(0)
        return self.inner.score(problems, step_lists)

    def score(self, problems, step_lists):
        raise AssertionError("the async search must await ascore")


@pytest.mark.parametrize("name", list(SEARCHES))
def test_async_equals_sync(name):
    search, search_async, options = SEARCHES[name]
    expected = search(PROBLEMS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), seed=3, **options)
    # models with only synchronous methods run on worker threads
    got = asyncio.run(search_async(PROBLEMS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), seed=3,
                                   **options))
    same_result(expected, got)
    assert got.strategy == expected.strategy
    # models with coroutine methods are awaited, never called synchronously
    generator, prm = AsyncGenerator(), AsyncPRM()
    got = asyncio.run(search_async(PROBLEMS, generator, prm, seed=3, **options))
    same_result(expected, got)
    assert generator.sync_calls == 0 and generator.most_in_flight == 1


def test_many_searches_share_one_loop():
    """Searches gathered on one loop interleave at their model calls and each equals its lone run."""
    generator = AsyncGenerator()
    seeds = range(5)

    async def main():
        return await asyncio.gather(*(beam_search_async(PROBLEMS, generator, AsyncPRM(), n=8, beam_width=2,
                                                        max_steps=12, seed=seed, **SIM) for seed in seeds))

    results = asyncio.run(main())
    assert generator.most_in_flight == len(seeds)  # every search had a call in flight at once
    for seed, result in zip(seeds, results, strict=True):
        alone = beam_search(PROBLEMS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=8, beam_width=2,
                            max_steps=12, seed=seed, **SIM)
        same_result(alone, result)


def test_concurrent_searches_from_threads_touch_no_process_state():
    """Two searches at once from threads give their lone results; neither touches the garbage collector or
    torch's thread count, which a model call (and any other thread of the process) sees unchanged."""
    threads, seen = torch.get_num_threads(), []
    barrier = threading.Barrier(2)

    class Watching(reasoning.SimulatedPRM):
        def score(self, problems, step_lists):
            seen.append((gc.isenabled(), torch.get_num_threads()))
            return super().score(problems, step_lists)

    class Meeting(reasoning.SimulatedGenerator):
        first = True

        def generate(self, prompts, **options):
            if self.first:  # both searches are running before either goes on
                self.first = False
                barrier.wait(timeout=30)
            return super().generate(prompts, **options)

    def run(seed):
        return particle_filter(PROBLEMS, Meeting(), Watching(), n=8, max_steps=12, seed=seed, **SIM)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, (1, 2)))
    assert seen and all(entry == (True, threads) for entry in seen)
    assert gc.isenabled() and torch.get_num_threads() == threads
    for seed, result in zip((1, 2), results, strict=True):
        same_result(particle_filter(PROBLEMS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=8,
                                    max_steps=12, seed=seed, **SIM), result)


def test_failures_and_cancellation_leave_nothing_behind():
    class Failing(AsyncPRM):
        async def ascore(self, problems, step_lists):
            raise RuntimeError("reward server gone")

    with pytest.raises(RuntimeError, match="reward server gone"):
        asyncio.run(beam_search_async(PROBLEMS, AsyncGenerator(), Failing(), n=4, beam_width=2, max_steps=5,
                                      seed=0, **SIM))

    class Slow(AsyncGenerator):
        async def agenerate(self, prompts, **options):
            await asyncio.sleep(30)

    async def cancel_midway():
        task = asyncio.create_task(beam_search_async(PROBLEMS, Slow(), AsyncPRM(), n=4, beam_width=2, max_steps=5,
                                                     seed=0, **SIM))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(cancel_midway()) == []


def test_async_refuses_group_and_checks_arguments():
    with pytest.raises(ValueError, match="beam_search_async takes no group="):
        asyncio.run(beam_search_async(PROBLEMS, AsyncGenerator(), AsyncPRM(), n=4, beam_width=2, seed=0,
                                      group=object()))
    with pytest.raises(ValueError, match="n must be divisible by beam_width"):
        asyncio.run(beam_search_async(PROBLEMS, AsyncGenerator(), AsyncPRM(), n=6, beam_width=4, seed=0))
    assert beam_search_async.__name__ == "beam_search_async" and "beam_width" in str(
        __import__("inspect").signature(beam_search_async))


# -- CompletionBatch ------------------------------------------------------------------------------------


def test_completion_batch_reads_as_nested_lists():
    batch = CompletionBatch(["a", "b", "c", "d", "e", "f"], [1, 2, 3, 4, 5, 6], [True, False] * 3, n=2)
    assert len(batch) == 3 and batch.n == 2
    assert batch[1] == [Completion("c", 3, True), Completion("d", 4, False)]
    assert batch[-1] == batch[2] and batch[0:2] == [batch[0], batch[1]]
    assert [len(p) for p in batch] == [2, 2, 2]
    with pytest.raises(IndexError):
        batch[3]
    assert len(CompletionBatch([], np.zeros(0), np.zeros(0), n=3)) == 0


@pytest.mark.parametrize("texts,tokens,finished,n,match", [
    (["a", "b"], [1], [True, True], 1, "one entry per completion"),
    (["a", "b", "c"], [1, 1, 1], [True] * 3, 2, "do not split into prompts of n=2"),
    (["a"], [1], [True], 0, "n must be an int >= 1"),
])
def test_completion_batch_bad_input(texts, tokens, finished, n, match):
    with pytest.raises(ValueError, match=match):
        CompletionBatch(texts, tokens, finished, n)


def test_search_takes_a_batch_or_nested_lists_alike():
    class AsLists(reasoning.SimulatedGenerator):
        def generate(self, prompts, **options):
            return list(super().generate(prompts, **options))

    class WrongShape(reasoning.SimulatedGenerator):
        def generate(self, prompts, *, n, **options):
            batch = super().generate(prompts, n=n, **options)
            return CompletionBatch(batch.texts, batch.num_tokens, batch.finished, n=1)

    for name in ("best_of_n", "beam_search", "particle_filter"):
        search, _, options = SEARCHES[name]
        same_result(search(PROBLEMS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), seed=5, **options),
                    search(PROBLEMS, AsLists(), reasoning.SimulatedPRM(), seed=5, **options))
    with pytest.raises(ValueError, match="CompletionBatch of 48 prompts x n=1 for 6 prompts x n=8"):
        best_of_n(PROBLEMS, WrongShape(), reasoning.SimulatedPRM(), n=8, seed=0)


def test_completion_batch_equality():
    batch = CompletionBatch(["a", "b"], [1, 2], [True, False], n=1)
    assert batch == CompletionBatch(["a", "b"], np.array([1, 2]), np.array([True, False]), n=1)
    assert batch == [[Completion("a", 1, True)], [Completion("b", 2, False)]]
    assert batch != CompletionBatch(["a", "b"], [1, 3], [True, False], n=1)
    assert batch != CompletionBatch(["a", "b"], [1, 2], [True, False], n=2)
    assert batch != [[Completion("a", 1, True)]]
