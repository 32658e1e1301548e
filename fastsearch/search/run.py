"""One search's shared machinery: options, generator and verifier calls with their accounting, the result.

Per-beam data lives in flat Python lists (texts) and numpy / torch arrays (everything else); every decision
(which beam survives, which answer wins) is taken on tensors by the fastsearch ops. What remains per beam
in Python is moving strings: list comprehensions that gather or concatenate them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from itertools import chain, repeat
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.checks import check_callable, check_choice, check_float, check_int, check_texts
from fastsearch.ops.score import AGGREGATIONS
from fastsearch.search.types import VOTES, Completion, CompletionBatch, SearchResult, Spent
from fastsearch.seeding import Stream, derive_seed, resolve_seed


def split_steps(texts: Sequence[str], delimiter: str) -> list[tuple[str, ...]]:
    """Full solutions cut into steps; a trailing delimiter ends the last step, it opens no empty one."""
    ends = repeat(delimiter)
    return list(map(tuple, map(str.split, map(str.removesuffix, texts, ends), ends)))


def as_numpy(values: Sequence, dtype) -> np.ndarray:
    """A Python sequence as a numpy array (several times faster than ``torch.tensor`` on a list)."""
    return np.fromiter(values, dtype=dtype, count=len(values))


Result = TypeVar("Result")
Plan = Generator["ModelCall", Any, Result]
"""A search plan: a generator that yields the model calls it needs, gets their answers sent back, and returns
its result. :func:`drive` runs one with plain calls, :func:`drive_async` with awaited ones."""


class ModelCall(NamedTuple):
    """One generator or verifier call a search plan asks for: ``getattr(model, method)(*args, **kwargs)``."""

    model: Any
    method: str
    args: tuple
    kwargs: dict


def drive(plan: Plan[Result]) -> Result:
    """Run a search plan to its result, making each model call it yields directly."""
    try:
        call = next(plan)
        while True:
            try:
                answer = getattr(call.model, call.method)(*call.args, **call.kwargs)
            except BaseException as err:
                call = plan.throw(err)
            else:
                call = plan.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()


async def call_async(call: ModelCall):
    """Await a model call: the model's ``a<method>`` coroutine function (e.g. ``agenerate``) when it has one,
    else its synchronous method on a worker thread (``asyncio.to_thread``), so the event loop stays free."""
    method = getattr(call.model, "a" + call.method, None)
    if inspect.iscoroutinefunction(method):
        return await method(*call.args, **call.kwargs)
    return await asyncio.to_thread(getattr(call.model, call.method), *call.args, **call.kwargs)


async def drive_async(plan: Plan[Result]) -> Result:
    """Run a search plan on the running event loop, awaiting each model call it yields (:func:`call_async`).

    The plan's own work between calls (bookkeeping and the fastsearch ops, microseconds per beam) runs on the
    loop's thread; many searches share one loop and interleave at their model calls.
    """
    try:
        call = next(plan)
        while True:
            try:
                answer = await call_async(call)
            except BaseException as err:
                call = plan.throw(err)
            else:
                call = plan.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()


def search_entry(plan_fn: Callable[..., Plan[Any]]) -> Callable[..., Any]:
    """The synchronous search of a plan function (its signature and docstring, ``group=None`` included).

    ``group`` (a torch.distributed process group) splits the problems over the ranks
    (:func:`~fastsearch.search.sharding.on_problem_shards`); without it the plan runs under :func:`drive`.
    :func:`async_entry` makes the awaitable twin.
    """
    from fastsearch.search.sharding import on_problem_shards

    signature = inspect.signature(plan_fn)

    @functools.wraps(plan_fn)
    def search(*args, **kwargs):
        if kwargs.get("group") is not None:  # keyword-only in every search: no binding without it
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            return on_problem_shards(search, arguments.arguments)
        return drive(plan_fn(*args, **kwargs))

    return search


def async_entry(search: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The awaitable twin of a search made by :func:`search_entry`: same arguments but ``group``."""
    plan_fn = search.__wrapped__
    name = f"{search.__name__}_async"

    async def search_async(*args, **kwargs):
        if kwargs.get("group") is not None:
            raise ValueError(f"{name} takes no group=: shard problems over ranks with the synchronous "
                             f"{search.__name__}")
        return await drive_async(plan_fn(*args, **kwargs))

    search_async.__name__ = search_async.__qualname__ = name
    search_async.__module__ = search.__module__
    search_async.__signature__ = inspect.signature(plan_fn)
    search_async.__doc__ = (f"Awaitable :func:`{search.__name__}`: the same search with the same arguments "
                            f"(``group`` excepted), run on the running event loop.\n\n"
                            "Generator and verifier calls are awaited: a model's ``agenerate`` / ``ascore`` / "
                            "``ascore_completions`` coroutine when it has one, else its synchronous method on a "
                            "worker thread. Many searches can share one event loop; each changes no process-wide "
                            f"state.\n\nExample:\n    >>> result = await {name}(problems, generator, verifier, ...)\n")
    return search_async


class SearchRun:
    """Validated options and running totals of one search over a batch of problems.

    ``generate``, ``score`` and ``score_completions`` wrap the user's generator and verifier: one call each
    for all problems, timed, checked (n completions per prompt, one score per step) and counted. They are
    generators (use them with ``yield from``): each yields one :class:`ModelCall` and gets its answer back, so
    one search plan runs under :func:`drive` (plain calls) or :func:`drive_async` (awaited calls). A search
    changes no process-wide state (garbage collector, torch's thread count): a server may run many at once.
    """

    def __init__(self, strategy: str, problems, generator, verifier, *, aggregate: str, vote: str,
                 answer_fn: Callable[[str], str], temperature: float, max_tokens: int, seed: int | None,
                 step_delimiter: str, prompt_fn: Callable[[str], str] | None, progress: bool,
                 whole_attempts: bool = False, verifier_optional: bool = False):
        self.start = time.perf_counter()
        self.problems = check_texts("problems", problems)
        check_models(generator, verifier, whole_attempts=whole_attempts, optional=verifier_optional)
        self.generator, self.verifier = generator, verifier
        self.strategy = strategy
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATIONS)
        self.vote = check_choice("vote", vote, VOTES)
        self.answer_fn = check_callable("answer_fn", answer_fn)
        self.temperature = check_float("temperature", temperature, low=0.0)
        self.max_tokens = check_int("max_tokens", max_tokens)
        self.seed = resolve_seed(seed)
        if not isinstance(step_delimiter, str):
            raise TypeError(f"step_delimiter must be a str, got {type(step_delimiter).__name__}")
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string, got ''")
        self.delimiter = step_delimiter
        if prompt_fn is None:
            self.prefixes = [problem + step_delimiter for problem in self.problems]
        else:
            check_callable("prompt_fn", prompt_fn)
            self.prefixes = [prompt_fn(problem) for problem in self.problems]
            wrong = next((i for i, prefix in enumerate(self.prefixes) if not isinstance(prefix, str)), None)
            if wrong is not None:
                raise TypeError(f"prompt_fn must return a str, got {type(self.prefixes[wrong]).__name__} for "
                                f"problem {wrong}")
        self.progress = bool(progress)
        self.num_problems = len(self.problems)
        self.tokens = np.zeros(self.num_problems, dtype=np.int64)
        self.sequences = 0
        self.generator_calls = 0
        self.verifier_calls = 0
        self.scored_steps = 0
        self.scored_completions = 0
        self.generator_seconds = 0.0
        self.verifier_seconds = 0.0

    def steps(self, count: int):
        return tqdm(range(count), desc=self.strategy, disable=not self.progress, leave=False)

    def generate(self, prompts: Sequence[str], owner: np.ndarray, *, n: int, stop: Sequence[str] | None,
                 temperature: float | None = None) -> Plan[tuple[Sequence[str], np.ndarray, np.ndarray]]:
        """One generator call: ``(texts, num_tokens int64, finished bool)``, n per prompt, prompt-major.

        ``owner`` [P] int64 is the problem of each prompt (for the per-problem token count).
        """
        seed = derive_seed(self.seed, Stream.GENERATE, self.generator_calls)
        began = time.perf_counter()
        outputs = yield ModelCall(self.generator, "generate", (prompts,), {
            "n": n, "stop": stop, "temperature": self.temperature if temperature is None else temperature,
            "max_tokens": self.max_tokens, "seed": seed})
        self.generator_seconds += time.perf_counter() - began
        self.generator_calls += 1
        texts, tokens, finished = completion_columns(outputs, len(prompts), n)
        self.sequences += len(texts)
        if not texts:
            return texts, tokens, finished
        per_sample_owner = owner if n == 1 else np.repeat(owner, n)
        self.tokens += np.bincount(per_sample_owner, weights=tokens, minlength=self.num_problems).astype(np.int64)
        return texts, tokens, finished

    def score(self, owner: np.ndarray, step_lists: Sequence[Sequence[str]]) -> Plan[torch.Tensor]:
        """One verifier call for all candidates: their aggregated scores [N] float32."""
        if not step_lists:
            return torch.zeros(0, dtype=torch.float32)
        candidate_problems = list(map(self.problems.__getitem__, owner.tolist()))
        expected = np.fromiter(map(len, step_lists), dtype=np.int64, count=len(step_lists))
        began = time.perf_counter()
        returned = yield ModelCall(self.verifier, "score", (candidate_problems, step_lists), {})
        self.verifier_seconds += time.perf_counter() - began
        self.verifier_calls += 1
        scores, offsets = packed_scores(returned, expected)
        self.scored_steps += scores.numel()
        return fastsearch.aggregate_steps(scores, offsets=offsets, method=self.aggregate)

    def score_completions(self, owner: np.ndarray, completions: Sequence[str]) -> Plan[torch.Tensor]:
        """Scores [N] float32 of whole attempts, in one verifier call; identical completions of one problem
        are scored once.

        ``owner`` [N] int64 is the problem of each completion. An :class:`AnswerVerifier` (a
        ``score_completions`` method) scores each attempt directly; a step verifier scores its steps (the
        text cut at the step delimiter), aggregated by ``aggregate``.
        """
        if not completions:
            return torch.zeros(0, dtype=torch.float32)
        ids: dict[tuple[int, str], int] = {}
        pairs = zip(owner.tolist(), completions, strict=True)
        inverse = as_numpy(list(map(ids.setdefault, pairs, range(len(completions)))), np.int64)
        unique = np.unique(inverse)  # first occurrence of each distinct (problem, completion), in order
        distinct = unique.size < len(completions)
        unique_owner = owner[unique] if distinct else owner
        unique_texts = list(map(completions.__getitem__, unique.tolist())) if distinct else list(completions)
        self.scored_completions += len(unique_texts)
        if callable(getattr(self.verifier, "score_completions", None)):
            candidate_problems = list(map(self.problems.__getitem__, unique_owner.tolist()))
            began = time.perf_counter()
            returned = yield ModelCall(self.verifier, "score_completions", (candidate_problems, unique_texts), {})
            self.verifier_seconds += time.perf_counter() - began
            self.verifier_calls += 1
            scores = completion_scores(returned, len(unique_texts))
        else:
            scores = yield from self.score(unique_owner, split_steps(unique_texts, self.delimiter))
        if not distinct:
            return scores
        # map every completion to the position of its first occurrence among the scored ones
        position = np.empty(len(completions), dtype=np.int64)
        position[unique] = np.arange(unique.size)
        return scores[torch.from_numpy(position[inverse])]

    def completions(self, prompts: Sequence[str], owner: np.ndarray) -> list[str]:
        """The generated part of full prompts (the problem's prefix cut off)."""
        prefix_length = [len(prefix) for prefix in self.prefixes]
        return [prompt[prefix_length[g]:] for prompt, g in zip(prompts, owner.tolist(), strict=True)]

    def finish(self, completions: Sequence[str], owner: np.ndarray, scores: torch.Tensor, *,
               order: np.ndarray | None = None, keep: int | None = None) -> SearchResult:
        """Group the final candidates by problem, keep the best ``keep`` of each, vote, and account.

        Args:
            completions: [T] final candidates in any problem order; ``owner`` [T] int64 their problems.
            scores: [T] float32 aggregated scores.
            order: [T] int64 order of the candidates within a problem (default: as given).
            keep: keep only the ``keep`` best-scoring candidates of each problem, best first.
        """
        completions = list(completions)
        key = owner if order is None else owner * (int(order.max()) + 1) + order
        if len(key) and bool((key[1:] < key[:-1]).any()):
            permutation = torch.sort(torch.from_numpy(key), stable=True).indices
            scores = scores[permutation]
            permutation = permutation.tolist()
            completions = list(map(completions.__getitem__, permutation))
            owner = owner[permutation]
        counts = torch.from_numpy(np.bincount(owner, minlength=self.num_problems))
        offsets = torch.zeros(self.num_problems + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        if keep is not None:
            kept = fastsearch.segmented_topk(scores, keep, offsets=offsets).indices
            valid = kept >= 0
            kept = kept[valid]
            scores = scores[kept]
            completions = list(map(completions.__getitem__, kept.tolist()))
            offsets = torch.zeros(self.num_problems + 1, dtype=torch.int64)
            torch.cumsum(valid.sum(-1), 0, out=offsets[1:])
        answers = list(map(self.answer_fn, completions))
        return self.result(self._choose(answers, scores, offsets), completions, answers, scores, offsets)

    def result(self, chosen: torch.Tensor, candidates: list[str], answers: list[str], scores: torch.Tensor,
               offsets: torch.Tensor, info: dict | None = None) -> SearchResult:
        """The search's result: each problem's pick (``chosen`` [G] flat indices into ``candidates``, -1 for
        none, which gives an empty completion and answer) among all its scored candidates."""
        picks = chosen.tolist()
        return SearchResult(
            completions=[candidates[i] if i >= 0 else "" for i in picks],
            answers=[answers[i] if i >= 0 else "" for i in picks],
            chosen=chosen,
            candidates=candidates,
            candidate_answers=answers,
            scores=scores,
            offsets=offsets,
            spent=self.spent(),
            strategy=self.strategy,
            info={} if info is None else info,
        )

    def _choose(self, answers: list[str], scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[G] int64 flat index of each problem's pick; -1 where a problem has no candidate with a score."""
        if self.vote == "none":
            return fastsearch.segmented_topk(scores, 1, offsets=offsets).indices[:, 0]
        keys = torch.from_numpy(answer_keys(answers))
        # a majority vote counts members only: it reads no score (there may be none, verifier=None)
        return fastsearch.vote(keys, None if self.vote == "majority" else scores, offsets=offsets, method=self.vote)

    def spent(self) -> Spent:
        wall = time.perf_counter() - self.start
        return Spent(
            generated_tokens=int(self.tokens.sum()),
            tokens_per_problem=torch.from_numpy(self.tokens.copy()),
            sequences=self.sequences,
            generator_calls=self.generator_calls,
            verifier_calls=self.verifier_calls,
            scored_steps=self.scored_steps,
            scored_completions=self.scored_completions,
            generator_seconds=self.generator_seconds,
            verifier_seconds=self.verifier_seconds,
            overhead_seconds=max(wall - self.generator_seconds - self.verifier_seconds, 0.0),
            wall_seconds=wall,
        )


# -- checks of the user's generator and verifier and of what they return -------------------------------


def answer_keys(answers: Sequence[str]) -> np.ndarray:
    """[N] int64: equal answers get equal keys (the index of the answer's first appearance)."""
    ids: dict[str, int] = {}
    return as_numpy(list(map(ids.setdefault, answers, range(len(answers)))), np.int64)


def check_models(generator, verifier, *, whole_attempts: bool = False, optional: bool = False) -> None:
    """The generator has ``generate``; the verifier has ``score`` (a step verifier), or, where the search
    scores whole attempts, ``score`` or ``score_completions``; None where the search needs no verifier."""
    if not callable(getattr(generator, "generate", None)):
        raise TypeError(f"generator must have a generate(prompts, *, n, stop, temperature, max_tokens, seed) "
                        f"method, got {type(generator).__name__}")
    if verifier is None and optional:
        return
    if callable(getattr(verifier, "score", None)):
        return
    if whole_attempts:
        if not callable(getattr(verifier, "score_completions", None)):
            raise TypeError(f"verifier must have a score(problems, step_lists) or a score_completions(problems, "
                            f"completions) method, got {type(verifier).__name__}")
        return
    raise TypeError(f"verifier must have a score(problems, step_lists) method, got {type(verifier).__name__}")


def completion_scores(returned, num: int) -> torch.Tensor:
    """An :class:`AnswerVerifier`'s answer as scores [num] float32, checked: one score per completion."""
    if isinstance(returned, torch.Tensor):
        scores = returned.detach().to("cpu", torch.float32)
    elif isinstance(returned, Sequence) and not isinstance(returned, str):
        try:
            scores = torch.from_numpy(np.asarray(returned, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise TypeError("verifier.score_completions must return one float per completion") from exc
    else:
        raise TypeError(f"verifier.score_completions must return a sequence of floats or a tensor, got "
                        f"{type(returned).__name__}")
    if scores.dim() != 1 or scores.numel() != num:
        raise ValueError(f"verifier.score_completions returned scores of shape {list(scores.shape)} for {num} "
                         f"completions, expected [{num}]")
    return scores


def completion_columns(outputs, num_prompts: int, n: int) -> tuple[Sequence[str], np.ndarray, np.ndarray]:
    """A generator's answer as ``(texts [P * n], num_tokens [P * n] int64, finished [P * n] bool)``, checked:
    a :class:`~fastsearch.search.CompletionBatch` as it is, nested lists of Completion flattened."""
    if isinstance(outputs, CompletionBatch):
        if len(outputs) != num_prompts or outputs.n != n:
            raise ValueError(f"generator.generate returned a CompletionBatch of {len(outputs)} prompts x n="
                             f"{outputs.n} for {num_prompts} prompts x n={n}")
        return outputs.texts, outputs.num_tokens, outputs.finished
    flat = flat_completions(outputs, num_prompts, n)
    if not flat:
        return [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if not isinstance(flat[0], Completion):
        raise TypeError(f"generator.generate must return Completion(text, num_tokens, finished) tuples, got "
                        f"{type(flat[0]).__name__}")
    texts, tokens, finished = zip(*flat, strict=True)
    return texts, as_numpy(tokens, np.int64), as_numpy(finished, bool)


def flat_completions(outputs, num_prompts: int, n: int) -> list[Completion]:
    """The generator's per-prompt lists flattened (prompt-major), after checking there are n per prompt."""
    if not isinstance(outputs, Sequence) or len(outputs) != num_prompts:
        got = len(outputs) if isinstance(outputs, Sequence) else type(outputs).__name__
        raise ValueError(f"generator.generate returned {got} lists for {num_prompts} prompts: expected one list "
                         f"of n={n} completions per prompt")
    flat = list(chain.from_iterable(outputs))
    if len(flat) != num_prompts * n:
        wrong = next(i for i, per_prompt in enumerate(outputs) if len(per_prompt) != n)
        raise ValueError(f"generator.generate returned {len(outputs[wrong])} completions for prompt {wrong}, "
                         f"expected n={n}")
    return flat


def packed_scores(returned, expected_steps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's answer as ``(scores [S] float32, offsets [N + 1] int64)``, checked against the
    number of steps each candidate has (``expected_steps`` [N] int64)."""
    num = expected_steps.shape[0]
    if isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[0], torch.Tensor):
        scores, offsets = returned
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1:
            raise TypeError("verifier.score returned packed scores whose offsets are not a 1-D int64 tensor")
        offsets = offsets.detach().cpu()
        bounds = offsets.numpy()
        if bounds.size != num + 1:
            raise ValueError(f"verifier.score returned offsets for {bounds.size - 1} candidates, expected {num} "
                             "(one per step list)")
        scores = scores.detach().reshape(-1).to("cpu", torch.float32)
        if bounds[0] != 0 or bounds[-1] != scores.numel():
            raise ValueError(f"verifier.score returned offsets {bounds[0]} ... {bounds[-1]} for {scores.numel()} "
                             "scores: they must run from 0 to the number of scores")
        counts = np.diff(bounds)
    else:
        if isinstance(returned, str) or not isinstance(returned, Sequence):
            raise TypeError(f"verifier.score must return a list of score lists or (scores, offsets) tensors, got "
                            f"{type(returned).__name__}")
        if len(returned) != num:
            raise ValueError(f"verifier.score returned {len(returned)} score lists for {num} candidates, expected "
                             "one per step list")
        counts = np.fromiter(map(len, returned), dtype=np.int64, count=num)
        scores = torch.from_numpy(np.array(list(chain.from_iterable(returned)), dtype=np.float32))
        offsets = torch.from_numpy(np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts)]))
    if not np.array_equal(counts, expected_steps):
        wrong = int(np.flatnonzero(counts != expected_steps)[0])
        raise ValueError(f"verifier.score returned {int(counts[wrong])} scores for candidate {wrong}, which has "
                         f"{int(expected_steps[wrong])} steps: expected one score per step")
    return scores, offsets
