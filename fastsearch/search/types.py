"""The LLM search API's types: generator and verifier protocols, completions, results, compute spent.

Any object with the right method works as a generator or verifier; :class:`Generator` and
:class:`StepVerifier` are ``typing.Protocol`` classes for documentation and static checking, with no base
class to inherit.

Texts are opaque to the search: it cuts them only at the step delimiter, concatenates them into prompts
and hands them to the verifier and to ``answer_fn``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from fastsearch.ops._common import MAX_SEED

VOTES = ("none", "majority", "weighted")
AGGREGATIONS = ("last", "min", "prod", "mean", "max", "logit_sum")


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


class Generator(Protocol):
    """What the search algorithms call to sample text.

    ``generate`` returns, for each prompt in order, a list of ``n`` :class:`Completion`. Samples are
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


# -- seeds ----------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A seed in [0, 2**63) for one use (``keys``, e.g. stream and step) of a search's ``seed``.

    Distinct keys give unrelated seeds, so every generator call and every resampling step draws from its
    own stream and a search is a deterministic function of its seed.
    """
    value = _splitmix64(seed)
    for key in keys:
        value = _splitmix64(value ^ (key & _MASK64))
    return value % MAX_SEED


# -- validation and conversion ----------------------------------------------------------------------------


def check_problems(problems) -> list[str]:
    if isinstance(problems, str) or not isinstance(problems, Sequence):
        raise TypeError(f"problems must be a list of strings, got {type(problems).__name__}")
    if len(problems) == 0:
        raise ValueError("problems is empty: give at least one problem")
    problems = list(problems)
    for index, problem in enumerate(problems):
        if not isinstance(problem, str):
            raise TypeError(f"problems[{index}] must be a str, got {type(problem).__name__}")
    return problems


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_models(generator, verifier) -> None:
    if not callable(getattr(generator, "generate", None)):
        raise TypeError(f"generator must have a generate(prompts, *, n, stop, temperature, max_tokens, seed) "
                        f"method, got {type(generator).__name__}")
    if not callable(getattr(verifier, "score", None)):
        raise TypeError(f"verifier must have a score(problems, step_lists) method, got {type(verifier).__name__}")


def check_callable(name: str, value: Callable) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {value!r}")
    return float(value)


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def flat_completions(outputs, num_prompts: int, n: int) -> list[Completion]:
    """The generator's per-prompt lists flattened (prompt-major), after checking there are n per prompt."""
    if not isinstance(outputs, Sequence) or len(outputs) != num_prompts:
        got = len(outputs) if isinstance(outputs, Sequence) else type(outputs).__name__
        raise ValueError(f"generator.generate returned {got} lists for {num_prompts} prompts: expected one list "
                         f"of n={n} completions per prompt")
    flat = list(itertools.chain.from_iterable(outputs))
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
        scores = torch.from_numpy(np.array(list(itertools.chain.from_iterable(returned)), dtype=np.float32))
        offsets = torch.from_numpy(np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts)]))
    if not np.array_equal(counts, expected_steps):
        wrong = int(np.flatnonzero(counts != expected_steps)[0])
        raise ValueError(f"verifier.score returned {int(counts[wrong])} scores for candidate {wrong}, which has "
                         f"{int(expected_steps[wrong])} steps: expected one score per step")
    return scores, offsets
