"""The LLM search API's types: generator and verifier protocols, completions, results, compute spent.

Any object with the right method works as a generator or verifier; :class:`Generator`,
:class:`StepVerifier` (a process reward model, one score per step) and :class:`AnswerVerifier` (an
outcome reward model, one score per whole attempt) are ``typing.Protocol`` classes for documentation and
static checking, with no base class to inherit.

Texts are opaque to the search: it cuts them only at the step delimiter, concatenates them into prompts
and hands them to the verifier and to ``answer_fn``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from fastsearch.checks import check_float, check_int, check_texts
from fastsearch.seeding import check_seed

VOTES = ("none", "majority", "weighted")


class Completion(NamedTuple):
    """One sampled continuation of a prompt.

    Attributes:
        text: the generated text. When generation stopped at a stop string the text ends with it (as
            vLLM's ``include_stop_str_in_output=True`` returns it).
        num_tokens: tokens generated (the compute it cost).
        finished: True when generation ended with the end-of-sequence token; False when it stopped at a
            stop string or ran into ``max_tokens``.
    """

    text: str
    num_tokens: int
    finished: bool


class CompletionBatch(Sequence):
    """A generator's answer for P prompts x n samples as three flat columns (prompt-major, sample ``p * n + j``
    is prompt p's j-th), with no Python object per completion.

    It reads as the protocol's nested lists (``len(batch) == P``; ``batch[p]`` is prompt p's list of n
    :class:`Completion`), and the searches take its columns as they are. At thousands of beams that matters:
    every Completion and per-prompt list is an object Python's cyclic garbage collector tracks, and while a
    search step holds tens of thousands of them its full collections (each a walk over every tracked object of
    the process) come several times more often. The generators of fastsearch return one.

    Args:
        texts: [P * n] completion texts.
        num_tokens: [P * n] tokens generated per completion (ints; kept as an int64 numpy array).
        finished: [P * n] True where the completion ended with the end-of-sequence token.
        n: completions per prompt (>= 1).
    """

    __slots__ = ("texts", "num_tokens", "finished", "n")

    def __init__(self, texts: Sequence[str], num_tokens, finished, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.texts = texts if isinstance(texts, list) else list(texts)
        self.num_tokens = np.asarray(num_tokens, dtype=np.int64).reshape(-1)
        self.finished = np.asarray(finished, dtype=bool).reshape(-1)
        self.n = n
        count = len(self.texts)
        if self.num_tokens.size != count or self.finished.size != count:
            raise ValueError(f"texts, num_tokens and finished must have one entry per completion, got {count}, "
                             f"{self.num_tokens.size} and {self.finished.size}")
        if count % n:
            raise ValueError(f"{count} completions do not split into prompts of n={n}")

    def __len__(self) -> int:
        return len(self.texts) // self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[p] for p in range(*index.indices(len(self)))]
        p = range(len(self))[index]  # IndexError / TypeError as a list gives them
        low = p * self.n
        return list(map(Completion, self.texts[low:low + self.n], self.num_tokens[low:low + self.n].tolist(),
                        self.finished[low:low + self.n].tolist()))

    def __eq__(self, other) -> bool:
        """Equal to a batch with the same columns and n, or to nested lists holding the same completions."""
        if isinstance(other, CompletionBatch):
            return (self.n == other.n and list(self.texts) == list(other.texts)
                    and np.array_equal(self.num_tokens, other.num_tokens)
                    and np.array_equal(self.finished, other.finished))
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(
                list(mine) == list(theirs) for mine, theirs in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # mutable columns

    def __repr__(self) -> str:
        return f"CompletionBatch(prompts={len(self)}, n={self.n})"


class GenerateArgs(NamedTuple):
    """The arguments of one ``Generator.generate`` call, checked (:func:`check_generate_args`)."""

    prompts: list[str]
    n: int
    stop: list[str]
    temperature: float
    max_tokens: int
    seed: int | None


def check_generate_args(prompts, n, stop, temperature, max_tokens, seed) -> GenerateArgs:
    """What every generator checks first: P prompt texts, ``n`` >= 1, stop strings (None: none; each non-empty),
    ``temperature`` >= 0, ``max_tokens`` >= 1, a seed in [0, 2**63) or None. TypeError / ValueError naming
    the argument."""
    stop = [] if stop is None else check_texts("stop", stop, allow_empty=True)
    if any(not text for text in stop):
        raise ValueError("stop strings must be non-empty, got ''")
    return GenerateArgs(check_texts("prompts", prompts, allow_empty=True), check_int("n", n), stop,
                        check_float("temperature", temperature, low=0.0), check_int("max_tokens", max_tokens),
                        None if seed is None else check_seed(seed))


def check_step_lists(problems, step_lists) -> tuple[list[str], list[tuple[str, ...]]]:
    """What every step verifier checks first: one problem text per candidate and, per candidate, a sequence of
    step texts. ``(problems, step tuples)``; TypeError / ValueError naming the argument."""
    problems = check_texts("problems", problems, allow_empty=True)
    if isinstance(step_lists, str) or not isinstance(step_lists, Sequence):
        raise TypeError(f"step_lists must be a sequence of step lists, got {type(step_lists).__name__}")
    if len(problems) != len(step_lists):
        raise ValueError(f"problems has {len(problems)} entries but step_lists has {len(step_lists)}: one "
                         "problem per candidate")
    return problems, [tuple(check_texts(f"step_lists[{index}]", steps, allow_empty=True))
                      for index, steps in enumerate(step_lists)]


class Generator(Protocol):
    """What the search algorithms call to sample text.

    ``generate`` returns, for each prompt in order, a list of ``n`` :class:`Completion` (or the same as one
    :class:`CompletionBatch`, which costs the searches less). Samples are
    independent draws even where prompts repeat within one call (beam search sends a surviving beam's
    prompt once per child). With ``temperature == 0`` the generator decodes greedily; with an int
    ``seed`` the call is a deterministic function of its arguments.
    """

    def generate(self, prompts: Sequence[str], *, n: int, stop: Sequence[str] | None, temperature: float,
                 max_tokens: int, seed: int | None) -> Sequence[Sequence[Completion]]: ...


class StepVerifier(Protocol):
    """A process reward model: one score per reasoning step, higher is better (usually in [0, 1]).

    ``score(problems, step_lists)`` gets one entry per candidate: ``problems[i]`` is the problem of
    candidate i and ``step_lists[i]`` its steps so far (texts without the step delimiter). It returns
    one list of ``len(step_lists[i])`` scores per candidate, or the same packed as ``(scores [S] float,
    offsets [N + 1] int64)`` with ``S`` the total number of steps.
    """

    def score(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]
              ) -> Sequence[Sequence[float]] | tuple[torch.Tensor, torch.Tensor]: ...


class AnswerVerifier(Protocol):
    """An outcome reward model (ORM): one score per whole attempt, higher is better (usually in [0, 1]).

    ``score_completions(problems, completions)`` gets one entry per attempt: ``problems[i]`` is the problem
    of attempt i and ``completions[i]`` its full generated text. It returns N scores, as a sequence of
    floats or a float tensor of shape [N]. The searches that score whole attempts (:func:`best_of_n`,
    :func:`revisions`) take either kind of verifier; a :class:`StepVerifier` serves as an ORM by
    aggregating its step scores (:class:`~fastsearch.search.AggregatedSteps` does it explicitly).
    """

    def score_completions(self, problems: Sequence[str], completions: Sequence[str]
                          ) -> Sequence[float] | torch.Tensor: ...


@dataclass
class Spent:
    """The compute one search spent.

    Attributes:
        generated_tokens: tokens the generator produced, lookahead rollouts included.
        tokens_per_problem: [G] int64, the same per problem.
        sequences: completions the generator returned (one per step and beam, or per full sample).
        generator_calls: calls to ``generator.generate``.
        verifier_calls: calls to ``verifier.score``.
        scored_steps: step scores the verifier returned (a PRM re-reads every earlier step each call).
        scored_completions: whole attempts sent to the verifier by the searches that score full solutions
            (identical completions of one problem count once: they are scored once).
        generator_seconds / verifier_seconds: wall time inside those calls.
        overhead_seconds: wall time outside them: fastsearch's own bookkeeping and selection.
        wall_seconds: the whole search.
    """

    generated_tokens: int = 0
    tokens_per_problem: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    sequences: int = 0
    generator_calls: int = 0
    verifier_calls: int = 0
    scored_steps: int = 0
    scored_completions: int = 0
    generator_seconds: float = 0.0
    verifier_seconds: float = 0.0
    overhead_seconds: float = 0.0
    wall_seconds: float = 0.0

    def __add__(self, other: Spent) -> Spent:
        """Two searches run one after the other on the same problems (e.g. a probe, then the search)."""
        return Spent(
            generated_tokens=self.generated_tokens + other.generated_tokens,
            tokens_per_problem=self.tokens_per_problem + other.tokens_per_problem,
            sequences=self.sequences + other.sequences,
            generator_calls=self.generator_calls + other.generator_calls,
            verifier_calls=self.verifier_calls + other.verifier_calls,
            scored_steps=self.scored_steps + other.scored_steps,
            scored_completions=self.scored_completions + other.scored_completions,
            generator_seconds=self.generator_seconds + other.generator_seconds,
            verifier_seconds=self.verifier_seconds + other.verifier_seconds,
            overhead_seconds=self.overhead_seconds + other.overhead_seconds,
            wall_seconds=self.wall_seconds + other.wall_seconds,
        )


@dataclass
class SearchResult:
    """What a search returns for a batch of G problems.

    Attributes:
        completions: [G] the chosen completion (generated text, without the prompt) per problem.
        answers: [G] its answer (``answer_fn`` of the completion).
        chosen: [G] int64 index of the chosen candidate in the flat candidate lists.
        candidates: [T] every final candidate's completion, problem by problem.
        candidate_answers: [T] their answers.
        scores: [T] float32 their aggregated verifier scores.
        offsets: [G + 1] int64; problem g owns candidates ``offsets[g]:offsets[g + 1]``.
        spent: the compute spent.
        strategy: the algorithm and its settings, e.g. ``"beam_search(n=16, beam_width=4)"``.
        info: algorithm-specific extras (e.g. the compute-optimal policy's choices).
    """

    completions: list[str]
    answers: list[str]
    chosen: torch.Tensor
    candidates: list[str]
    candidate_answers: list[str]
    scores: torch.Tensor
    offsets: torch.Tensor
    spent: Spent
    strategy: str
    info: dict = field(default_factory=dict)

    def candidates_of(self, problem: int) -> list[tuple[str, str, float]]:
        """``(completion, answer, score)`` of every final candidate of one problem."""
        start, end = int(self.offsets[problem]), int(self.offsets[problem + 1])
        return list(zip(self.candidates[start:end], self.candidate_answers[start:end],
                        self.scores[start:end].tolist(), strict=True))


_BOXED = "\\boxed{"
_LAST_LINE = re.compile(r"[^\n]*\S[^\n]*")


def extract_answer(text: str) -> str:
    """The default ``answer_fn``: the content of the last ``\\boxed{...}`` (braces balanced), else the last
    non-blank line, stripped. Candidates with equal answers vote together."""
    start = text.rfind(_BOXED)
    if start >= 0:
        depth, begin = 1, start + len(_BOXED)
        for position in range(begin, len(text)):
            char = text[position]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[begin:position].strip()
    lines = _LAST_LINE.findall(text)
    return lines[-1].strip() if lines else ""
