"""One search's shared machinery: options, generator and verifier calls with their accounting, the result.

Per-beam data lives in flat Python lists (texts) and numpy / torch arrays (everything else); every decision
(which beam survives, which answer wins) is taken on tensors by the fastsearch ops. What remains per beam
in Python is moving strings: list comprehensions that gather or concatenate them.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Sequence
from itertools import chain, repeat

import numpy as np
import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.checks import check_callable, check_choice, check_float, check_int, check_texts
from fastsearch.ops.score import AGGREGATIONS
from fastsearch.search.types import VOTES, Completion, SearchResult, Spent
from fastsearch.seeding import Stream, derive_seed, resolve_seed


def split_steps(texts: Sequence[str], delimiter: str) -> list[tuple[str, ...]]:
    """Full solutions cut into steps; a trailing delimiter ends the last step, it opens no empty one."""
    ends = repeat(delimiter)
    return list(map(tuple, map(str.split, map(str.removesuffix, texts, ends), ends)))


def as_numpy(values: Sequence, dtype) -> np.ndarray:
    """A Python sequence as a numpy array (several times faster than ``torch.tensor`` on a list)."""
    return np.fromiter(values, dtype=dtype, count=len(values))


class SearchRun:
    """Validated options and running totals of one search over a batch of problems.

    ``generate`` and ``score`` wrap the user's generator and verifier: one call each for all problems,
    timed, checked (n completions per prompt, one score per step) and counted.

    Used as a context manager, it sets two process-wide knobs for the search and restores them after:

    - Python's cyclic garbage collector is paused: the bookkeeping allocates a few containers per beam
      and step and makes no reference cycles (reference counting frees it all), but each collector pass
      walks every live container, which costs more than the search itself at thousands of beams.
    - torch runs on the calling thread (``torch.set_num_threads(1)``) while fastsearch works, and with
      the caller's thread count inside the generator and verifier calls: the search's own tensors are a
      few kilobytes per step, and on a busy CPU the fork-join of a parallel region around them can take
      milliseconds.
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

    def __enter__(self) -> SearchRun:
        self._collector_was_enabled = gc.isenabled()
        self._threads = torch.get_num_threads()
        gc.disable()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc_info) -> None:
        torch.set_num_threads(self._threads)
        if self._collector_was_enabled:
            gc.enable()

    @contextlib.contextmanager
    def _caller_threads(self):
        """The caller's torch thread count, for the generator and verifier calls."""
        torch.set_num_threads(self._threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def steps(self, count: int):
        return tqdm(range(count), desc=self.strategy, disable=not self.progress, leave=False)

    def generate(self, prompts: Sequence[str], owner: np.ndarray, *, n: int, stop: Sequence[str] | None,
                 temperature: float | None = None) -> tuple[Sequence[str], np.ndarray, np.ndarray]:
        """One generator call: ``(texts, num_tokens int64, finished bool)``, n per prompt, prompt-major.

        ``owner`` [P] int64 is the problem of each prompt (for the per-problem token count).
        """
        seed = derive_seed(self.seed, Stream.GENERATE, self.generator_calls)
        began = time.perf_counter()
        with self._caller_threads():
            outputs = self.generator.generate(prompts, n=n, stop=stop,
                                              temperature=self.temperature if temperature is None else temperature,
                                              max_tokens=self.max_tokens, seed=seed)
        self.generator_seconds += time.perf_counter() - began
        self.generator_calls += 1
        flat = flat_completions(outputs, len(prompts), n)
        if not flat:
            return [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        if not isinstance(flat[0], Completion):
            raise TypeError(f"generator.generate must return Completion(text, num_tokens, finished) tuples, got "
                            f"{type(flat[0]).__name__}")
        texts, tokens, finished = zip(*flat, strict=True)
        tokens = as_numpy(tokens, np.int64)
        self.sequences += len(flat)
        per_sample_owner = owner if n == 1 else np.repeat(owner, n)
        self.tokens += np.bincount(per_sample_owner, weights=tokens, minlength=self.num_problems).astype(np.int64)
        return texts, tokens, as_numpy(finished, bool)

    def score(self, owner: np.ndarray, step_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        """One verifier call for all candidates: their aggregated scores [N] float32."""
        if not step_lists:
            return torch.zeros(0, dtype=torch.float32)
        candidate_problems = list(map(self.problems.__getitem__, owner.tolist()))
        expected = np.fromiter(map(len, step_lists), dtype=np.int64, count=len(step_lists))
        began = time.perf_counter()
        with self._caller_threads():
            returned = self.verifier.score(candidate_problems, step_lists)
        self.verifier_seconds += time.perf_counter() - began
        self.verifier_calls += 1
        scores, offsets = packed_scores(returned, expected)
        self.scored_steps += scores.numel()
        return fastsearch.aggregate_steps(scores, offsets=offsets, method=self.aggregate)

    def score_completions(self, owner: np.ndarray, completions: Sequence[str]) -> torch.Tensor:
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
            with self._caller_threads():
                returned = self.verifier.score_completions(candidate_problems, unique_texts)
            self.verifier_seconds += time.perf_counter() - began
            self.verifier_calls += 1
            scores = completion_scores(returned, len(unique_texts))
        else:
            scores = self.score(unique_owner, split_steps(unique_texts, self.delimiter))
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
