"""A SIMULATED multi-step reasoning task: problems, a step generator and a process reward model (PRM).

No language model is involved. The simulation stands in for an LLM solving math problems step by step and
a PRM scoring the steps, with the failure modes test-time search has to deal with, so that every search
algorithm runs anywhere in seconds and its accuracy-against-compute curves take the shape reported for
real models (Snell et al. 2024):

- A problem has a difficulty d in [0, 1] (level 1 to 5: its fifth of the range), a number of reasoning
  steps L that grows with d, an integer answer, and a trap strength.
- :class:`SimulatedGenerator` writes one step at a time. A step makes a visible error with a
  probability that grows with d and with the sampling temperature; a chain that went wrong stays wrong
  and ends in a wrong answer (one of a few distractors). Some steps are shortcuts (terse, cheap in
  tokens); on a problem with a trap, a shortcut can fall into it: a subtle error that leads to the
  problem's one tempting wrong answer.
- :class:`SimulatedPRM` scores a step by a noisy function of whether the chain so far looks correct
  (noisier on harder problems, surest at the answer step). It cannot see the trap, and it likes
  shortcuts. Search that maximises the PRM hard finds and keeps trapped chains: the more it searches,
  the more reliably, as search over-exploits real PRMs.

The texts carry the simulation state in compact markers (``(sim: ...)`` in a problem, ``<hex>`` after each
step) that the generator and the PRM read; the search algorithms treat texts as opaque, as they must.
Everything is deterministic for a given seed and vectorised over samples with numpy.

Example:
    >>> problems = make_problems(64, seed=0)
    >>> result = fastsearch.search.beam_search([p.text for p in problems], SimulatedGenerator(), SimulatedPRM(),
    ...                                        n=16, beam_width=4, max_steps=10, answer_fn=extract_answer, seed=0)
    >>> accuracy(result.answers, problems)
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastsearch.checks import check_float, check_int
from fastsearch.models.revision_sim import RevisionModel
from fastsearch.search.types import CompletionBatch
from fastsearch.seeding import resolve_seed

LEVELS = 5
MAX_STEPS = 8  # the hardest problems take 8 reasoning steps (plus the answer step)

DEFAULT_REVISION = RevisionModel()  # how the simulated generator revises, unless told otherwise

_PROBLEM_OPEN, _PROBLEM_CLOSE = "(sim: ", ")"
_STEP_OPEN = "<"
_CODE_DIGITS = 16

# A step's state code (unsigned 64 bits, written after the step as 16 hex digits).
_TAG_BITS = 32  # bits 0-31: random, make every step distinct and fix the PRM's noise on it
_INDEX_SHIFT = 32  # bits 32-39: steps written so far, this one included
_CORRECT = 1 << 40  # the chain is still correct
_LOOKS_CORRECT = 1 << 41  # the chain looks correct to the PRM (it made no visible error)
_SHORTCUT = 1 << 42  # this step is a shortcut
_ANSWER = 1 << 43  # this is the answer step
_DISTRACTOR_SHIFT = 44  # bits 44-45: which wrong answer a wrong chain ends in (0: the trap's)
_DISTRACTOR_OFFSETS = np.array([1, -1, 10, -10])

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 arrays (wrapping arithmetic): a counter-based hash for the random draws."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Uniforms in [0, 1) from uint64 keys, one independent stream per ``stream`` number."""
    with np.errstate(over="ignore"):
        bits = _mix64(keys ^ (np.uint64(stream) * np.uint64(0xD1B54A32D192ED03)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _normal(keys: np.ndarray) -> np.ndarray:
    """Standard normals (Box-Muller) from uint64 keys."""
    radius = np.sqrt(-2.0 * np.log1p(-_uniform(keys, 0)))
    return radius * np.cos(2.0 * math.pi * _uniform(keys, 1))


@dataclass(frozen=True)
class SimulatedProblem:
    """One simulated problem.

    Attributes:
        text: the problem as the search sees it (with its ``(sim: ...)`` marker).
        answer: the correct answer, as :func:`extract_answer` reads it from a completion.
        level: 1 (easiest) to 5 (hardest): the fifth of the difficulty range.
        difficulty: in [0, 1].
        num_steps: reasoning steps before the answer.
        trap: chance that a shortcut step falls into the problem's trap.
    """

    text: str
    answer: str
    level: int
    difficulty: float
    num_steps: int
    trap: float


def make_problems(count: int, *, seed: int = 0, max_trap: float = 0.6) -> list[SimulatedProblem]:
    """``count`` problems, deterministic for a seed.

    Difficulties spread evenly over [0, 1) (shuffled), so every level holds about a fifth of them; L =
    3 + 5d steps (rounded, 3 to 8); trap strengths uniform in [0, ``max_trap``) (half the problems
    get none).

    Returns:
        list of :class:`SimulatedProblem`.
    """
    count = check_int("count", count)
    rng = np.random.default_rng(seed)
    difficulty = (rng.permutation(count) + rng.uniform(size=count)) / count
    num_steps = np.clip(np.round(3 + 5 * difficulty + rng.uniform(-0.5, 0.5, size=count)), 3, MAX_STEPS)
    answers = rng.integers(100, 1000, size=count)
    trap = np.where(rng.uniform(size=count) < 0.5, 0.0, rng.uniform(0, max_trap, size=count))
    problems = []
    for index in range(count):
        level = min(int(difficulty[index] * LEVELS), LEVELS - 1) + 1
        steps, answer = int(num_steps[index]), int(answers[index])
        text = (f"Simulated problem {index} (level {level}, {steps} steps) {_PROBLEM_OPEN}d={difficulty[index]:.6f} "
                f"steps={steps} answer={answer} trap={trap[index]:.6f}{_PROBLEM_CLOSE}")
        problems.append(SimulatedProblem(text, str(answer), level, float(difficulty[index]), steps,
                                         float(trap[index])))
    return problems


def extract_answer(text: str) -> str:
    """The answer a simulated completion states (``answer 417 <...>``), or "" when it never got there."""
    start = text.rfind("answer ")
    if start < 0:
        return ""
    end = text.find(" ", start + 7)
    return text[start + 7:end] if end > 0 else ""


def correct(answers: Sequence[str], problems: Sequence[SimulatedProblem]) -> torch.Tensor:
    """[G] bool: which answers are the problems' correct answers."""
    if len(answers) != len(problems):
        raise ValueError(f"got {len(answers)} answers for {len(problems)} problems")
    return torch.tensor([a == p.answer for a, p in zip(answers, problems, strict=True)], dtype=torch.bool)


def accuracy(answers: Sequence[str], problems: Sequence[SimulatedProblem]) -> float:
    """Fraction of answers equal to the problems' correct answers."""
    return float(correct(answers, problems).float().mean())


class _ProblemTable:
    """The parameters of every problem seen, parsed once from its marker."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.rows: list[tuple[float, int, int, float]] = []
        self._arrays: tuple[np.ndarray, ...] = ()

    def find(self, text: str) -> int:
        start = text.find(_PROBLEM_OPEN)
        end = text.find(_PROBLEM_CLOSE, start)
        if start < 0 or end < 0:
            raise ValueError(f"not a simulated problem (no {_PROBLEM_OPEN!r} marker): {text[:80]!r}")
        marker = text[start:end]
        found = self.index.get(marker)
        if found is None:
            try:
                fields = dict(item.split("=") for item in marker[len(_PROBLEM_OPEN):].split())
                row = float(fields["d"]), int(fields["steps"]), int(fields["answer"]), float(fields["trap"])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"malformed simulated-problem marker {marker!r}") from exc
            found = self.index[marker] = len(self.rows)
            self.rows.append(row)
        return found

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(difficulty, num_steps, answer, trap) of every problem seen, as arrays."""
        if not self._arrays or len(self._arrays[0]) != len(self.rows):
            difficulty, steps, answer, trap = zip(*self.rows, strict=True)
            self._arrays = (np.array(difficulty), np.array(steps, dtype=np.int64), np.array(answer, dtype=np.int64),
                            np.array(trap))
        return self._arrays


def _last_code(prompt: str) -> int:
    """The state code of the prompt's last step, 0 before the first step."""
    start = prompt.rfind(_STEP_OPEN)
    if start < 0:
        return 0
    return int(prompt[start + 1:start + 1 + _CODE_DIGITS], 16)


_ANSWER_STEP = re.compile(r"answer -?\d+ <([0-9a-f]{16})>")


def _prompt_state(prompt: str) -> tuple[int, int, int]:
    """``(code, seen, previous)``: the state code of the current attempt's last step (0: a fresh attempt),
    how many earlier complete attempts the prompt shows, and the code of the most recent one's answer step.

    A prompt whose last step is an answer step starts a fresh attempt when more text follows that step (a
    revision prompt); when nothing but blanks follows, the attempt is complete (and the code says so).
    """
    code = _last_code(prompt)
    if "answer " not in prompt:
        return code, 0, 0
    shown = _ANSWER_STEP.findall(prompt)
    if code & _ANSWER:
        if prompt[prompt.rfind(_STEP_OPEN) + _MARK_WIDTH:].strip():
            code = 0
        else:
            shown = shown[:-1]
    return code, len(shown), int(shown[-1], 16) if shown else 0


class _Revised:
    """Per-sample effects of the earlier attempts a prompt shows (see :class:`RevisionModel`)."""

    def __init__(self, model: RevisionModel, seen, previous, difficulty, num_steps):
        last_right = (seen > 0) & ((previous & np.uint64(_CORRECT)) != 0)
        self.scale = model.error_scale(difficulty, seen)
        self.breaks = model.break_per_step(difficulty, last_right, num_steps)
        self.anchor = model.anchor_probability(difficulty, (seen > 0) & ~last_right)
        self.looks_correct = (previous & np.uint64(_LOOKS_CORRECT)) != 0
        self.distractor = previous & np.uint64(3 << _DISTRACTOR_SHIFT)

    @classmethod
    def of(cls, model: RevisionModel | None, seen, previous, difficulty, num_steps) -> _Revised | None:
        """The effects, or None when no prompt shows an earlier attempt (or revisions are off)."""
        return None if model is None or not seen.any() else cls(model, seen, previous, difficulty, num_steps)


_MARK_WIDTH = _CODE_DIGITS + 2  # "<" + 16 hex digits + ">", the end of every simulated step
_HEX_VALUE = np.full(256, -1, dtype=np.int64)
_HEX_VALUE[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16)
_tail = operator.itemgetter(slice(-_MARK_WIDTH, None))


def _step_codes(steps: Sequence[str]) -> np.ndarray:
    """[S] int64 state codes of steps, -1 for a text that does not end with a step marker.

    Vectorised: the last 18 characters of every step are decoded together as one byte array.
    """
    tails = list(map(_tail, steps))
    if tails and set(map(len, tails)) != {_MARK_WIDTH}:  # a step shorter than a marker (it has none): pad it
        tails = [tail.rjust(_MARK_WIDTH) for tail in tails]
    marks = np.frombuffer("".join(tails).encode("ascii", "replace"), dtype=np.uint8).reshape(len(steps),
                                                                                            _MARK_WIDTH)
    digits = _HEX_VALUE[marks[:, 1:-1]]
    valid = (marks[:, 0] == ord(_STEP_OPEN)) & (marks[:, -1] == ord(">")) & (digits >= 0).all(-1)
    codes = (np.maximum(digits, 0) << (4 * np.arange(_CODE_DIGITS - 1, -1, -1))).sum(-1)
    return np.where(valid, codes, -1)


class SimulatedGenerator:
    """A simulated step-by-step solver of :func:`make_problems` problems (no language model inside).

    Implements the :class:`fastsearch.search.Generator` protocol. Given a prompt (a problem followed by
    the steps so far) it writes the next step, or with ``stop=None`` every remaining step up to the answer.
    At temperature T a step makes a visible error with probability ``(step_error_min + step_error_range
    * d^2) * (0.4 + 0.75 T)``: 7 % on the easiest problems to 55 % on the hardest at the usual T = 0.8,
    60 % less when decoding greedily. A share ``shortcut_rate`` of the steps are shortcuts; a shortcut
    on a problem with trap strength t falls into the trap with probability t (when it made no visible
    error): a subtle error that the PRM does not see and that ends in the trap's wrong answer.

    Revisions (a simulation, :class:`~fastsearch.models.revision_sim.RevisionModel`): a prompt that shows
    earlier complete attempts at the problem (any text holding their ``answer ... <code>`` steps) followed
    by more text, such as :func:`fastsearch.search.default_revision_prompt` writes, starts a new attempt
    conditioned on them: fewer errors the easier the problem and the more attempts shown, sometimes a
    right answer broken, on hard problems often a wrong one repeated. Steps written after such a prompt
    carry on the same attempt.

    Samples are keyed by (seed, prompt text, how many times the same prompt came before in this call,
    sample index), so they do not depend on how problems are batched. ``temperature=0`` is greedy: the
    sample depends on the prompt alone.

    Compute cost: with ``cost_per_call`` and ``cost_per_token`` (seconds) a call lasts at least
    ``cost_per_call + cost_per_token * generated tokens`` (the simulation's own time counts toward it;
    the remainder is slept). Realistic figures for a 1.5B-8B model served by vLLM on one H100: about
    20 ms fixed per batched call (scheduling, prefill of the batch, the decode tail of its longest
    sequence) and about 50 us per generated token at batch throughput (20 000 tokens/s), a ratio of 400
    tokens per call. The benchmarks keep that ratio at a 100 times smaller scale (``cost_per_call=2e-4``,
    ``cost_per_token=5e-7``) so that they finish in seconds. Both default to 0.

    Args:
        step_error_min / step_error_range: visible-error rate ``step_error_min + step_error_range * d^2``
            at temperature 0.8.
        shortcut_rate: chance that a step is a shortcut (terse: fewer tokens; the PRM likes it).
        step_delimiter: what separates steps when several are written at once (``stop=None``).
        cost_per_call / cost_per_token: simulated serving cost, see above.
        revision: how earlier attempts in a prompt change the next one (default :class:`RevisionModel`);
            None: earlier attempts change nothing.
    """

    def __init__(self, *, step_error_min: float = 0.06, step_error_range: float = 0.6, shortcut_rate: float = 0.15,
                 step_delimiter: str = "\n\n", cost_per_call: float = 0.0, cost_per_token: float = 0.0,
                 revision: RevisionModel | None = DEFAULT_REVISION):
        if revision is not None and not isinstance(revision, RevisionModel):
            raise TypeError(f"revision must be a RevisionModel or None, got {type(revision).__name__}")
        self.revision = revision
        self.step_error_min, self.step_error_range = step_error_min, step_error_range
        self.shortcut_rate = shortcut_rate
        self.step_delimiter = step_delimiter
        self.cost_per_call = check_float("cost_per_call", cost_per_call, low=0.0)
        self.cost_per_token = check_float("cost_per_token", cost_per_token, low=0.0)
        self._problems = _ProblemTable()

    def generate(self, prompts: Sequence[str], *, n: int = 1, stop: Sequence[str] | None = None,
                 temperature: float = 0.8, max_tokens: int = 2048, seed: int | None = None
                 ) -> CompletionBatch:
        """n simulated continuations of every prompt: one step (ending with ``stop[0]``) with ``stop``,
        else every step up to the answer.

        Returns:
            a :class:`~fastsearch.search.CompletionBatch`: per prompt, n completions.
        """
        began = time.perf_counter()
        seed = resolve_seed(seed)
        problem = np.fromiter(map(self._problems.find, prompts), dtype=np.int64, count=len(prompts))
        codes, seen, previous = (np.array(column, dtype=dtype) for column, dtype in zip(
            zip(*map(_prompt_state, prompts), strict=True), (np.uint64, np.int64, np.uint64), strict=True))
        if np.any(codes & np.uint64(_ANSWER)):
            raise ValueError("a prompt already ends with its answer step: nothing is left to generate")
        per_sample = np.repeat(problem, n)
        difficulty, num_steps, answers, trap = (column[per_sample] for column in self._problems.columns())
        revised = _Revised.of(self.revision, np.repeat(seen, n), np.repeat(previous, n), difficulty, num_steps)
        texts, tokens, finished = self._roll(self._sample_keys(prompts, n, temperature, seed), np.repeat(codes, n),
                                             difficulty, num_steps, answers, trap, temperature, revised,
                                             one_step=stop is not None, max_tokens=max_tokens,
                                             delimiter=stop[0] if stop else self.step_delimiter)
        completions = CompletionBatch(texts, tokens, finished, n)
        if self.cost_per_call or self.cost_per_token:
            remaining = self.cost_per_call + self.cost_per_token * float(tokens.sum()) - (time.perf_counter() - began)
            if remaining > 0:
                time.sleep(remaining)
        return completions

    @staticmethod
    def _sample_keys(prompts: Sequence[str], n: int, temperature: float, seed: int) -> np.ndarray:
        """[P * n] uint64 keys: (seed, prompt, repeat of the prompt in this call, sample); greedy: prompt."""
        count = len(prompts)
        prompt_hash = np.fromiter(map(zlib.crc32, map(str.encode, prompts)), dtype=np.uint64, count=count)
        if temperature == 0:
            return np.repeat(_mix64(prompt_hash), n)
        order = np.argsort(prompt_hash, kind="stable")
        sorted_hash = prompt_hash[order]
        first = np.concatenate([[True], sorted_hash[1:] != sorted_hash[:-1]])
        group_start = np.maximum.accumulate(np.where(first, np.arange(count), 0))
        repeat = np.empty(count, dtype=np.uint64)
        repeat[order] = (np.arange(count) - group_start).astype(np.uint64)
        with np.errstate(over="ignore"):
            base = _mix64(_mix64(prompt_hash ^ _mix64(np.uint64(seed))) + repeat * np.uint64(n))
            return _mix64(np.repeat(base, n) + np.tile(np.arange(n, dtype=np.uint64), count))

    def _roll(self, keys, codes, difficulty, num_steps, answers, trap, temperature, revised, *, one_step, max_tokens,
              delimiter):
        """Write steps for every sample until its answer (or one step): ``(texts, tokens, finished)``."""
        samples = keys.size
        visible_rate = (self.step_error_min + self.step_error_range * difficulty**2) * (0.4 + 0.75 * temperature)
        if revised is not None:
            visible_rate = 1.0 - (1.0 - visible_rate * revised.scale) * (1.0 - revised.breaks)
            trap = trap * revised.scale
        index = ((codes >> np.uint64(_INDEX_SHIFT)) & np.uint64(0xFF)).astype(np.int64)
        carried = np.uint64(_CORRECT | _LOOKS_CORRECT | (3 << _DISTRACTOR_SHIFT))
        state = np.where(index == 0, np.uint64(_CORRECT | _LOOKS_CORRECT), codes & carried)
        tokens = np.zeros(samples, dtype=np.int64)
        running = np.ones(samples, dtype=bool)
        finished = np.zeros(samples, dtype=bool)
        truncated = np.zeros(samples, dtype=bool)
        rounds = []  # per round: the samples that wrote a step, and their steps
        depth = 0
        while running.any():
            live = np.flatnonzero(running)
            with np.errstate(over="ignore"):
                step_keys = _mix64(keys[live] + np.uint64(depth + 1) * _GOLDEN)
            old = state[live]
            step_index = index[live] + 1
            is_answer = step_index > num_steps[live]
            shortcut = (_uniform(step_keys, 0) < self.shortcut_rate) & ~is_answer
            can_err = ((old & np.uint64(_CORRECT)) != 0) & ~is_answer
            visible = can_err & (_uniform(step_keys, 1) < visible_rate[live])
            trapped = can_err & shortcut & ~visible & (_uniform(step_keys, 2) < trap[live])
            if revised is not None:  # the first step of a revision may repeat the earlier attempt's mistake
                repeat = can_err & (step_index == 1) & (_uniform(step_keys, 5) < revised.anchor[live])
                visible, trapped = visible & ~repeat, trapped & ~repeat
            still_correct = ((old & np.uint64(_CORRECT)) != 0) & ~visible & ~trapped
            looks_correct = ((old & np.uint64(_LOOKS_CORRECT)) != 0) & ~visible
            if revised is not None:
                still_correct &= ~repeat
                looks_correct = np.where(repeat, revised.looks_correct[live], looks_correct)
            # A visible error leads to one of distractors 1-3, the trap to distractor 0; later steps keep it.
            distractor = np.where(trapped, 0, 1 + (_uniform(step_keys, 3) * 3).astype(np.int64))
            distractor_bits = np.where(visible | trapped, distractor.astype(np.uint64) << np.uint64(_DISTRACTOR_SHIFT),
                                       old & np.uint64(3 << _DISTRACTOR_SHIFT))
            if revised is not None:
                distractor_bits = np.where(repeat, revised.distractor[live], distractor_bits)
            low, high = np.where(shortcut, 12, 30), np.where(shortcut, 30, 80)
            step_tokens = np.where(is_answer, 10, low + (_uniform(step_keys, 4) * (high - low)).astype(np.int64))
            new_state = (np.where(still_correct, np.uint64(_CORRECT), np.uint64(0))
                         | np.where(looks_correct, np.uint64(_LOOKS_CORRECT), np.uint64(0))
                         | np.where(shortcut, np.uint64(_SHORTCUT), np.uint64(0))
                         | np.where(is_answer, np.uint64(_ANSWER), np.uint64(0)) | distractor_bits)
            code = (new_state | (step_index.astype(np.uint64) << np.uint64(_INDEX_SHIFT))
                    | (step_keys >> np.uint64(64 - _TAG_BITS)))
            distractor_index = ((distractor_bits >> np.uint64(_DISTRACTOR_SHIFT)) & np.uint64(3)).astype(np.int64)
            stated = np.where(still_correct, answers[live], answers[live] + _DISTRACTOR_OFFSETS[distractor_index])
            fits = tokens[live] + step_tokens <= max_tokens
            rounds.append((live[fits], [
                f"answer {value} <{step_code:016x}>" if answer_step else f"step {k} <{step_code:016x}>"
                for step_code, k, value, answer_step in zip(code[fits].tolist(), step_index[fits].tolist(),
                                                            stated[fits].tolist(), is_answer[fits].tolist(),
                                                            strict=True)]))
            tokens[live] = np.where(fits, tokens[live] + step_tokens, max_tokens)
            state[live], index[live] = new_state, step_index
            finished[live] = is_answer & fits
            truncated[live] = ~fits
            running[live] = fits & ~is_answer & (not one_step)
            depth += 1
        # A step cut short by max_tokens is left out; a step that stopped at the stop string ends with it.
        if one_step:
            writers, steps = rounds[0]
            texts = [""] * samples
            for sample, step, done in zip(writers.tolist(), steps, finished[writers].tolist(), strict=True):
                texts[sample] = step if done else step + delimiter
            return texts, tokens, finished
        pieces: list[list[str]] = [[] for _ in range(samples)]
        for writers, steps in rounds:
            for sample, step in zip(writers.tolist(), steps, strict=True):
                pieces[sample].append(step)
        ends_open = (~finished & ~truncated).tolist()
        texts = [delimiter.join(parts) + delimiter if open_end else delimiter.join(parts)
                 for parts, open_end in zip(pieces, ends_open, strict=True)]
        return texts, tokens, finished


class SimulatedPRM:
    """A simulated process reward model for :class:`SimulatedGenerator` steps (the
    :class:`fastsearch.search.StepVerifier` protocol).

    A step's score is ``sigmoid(s * (1 if the chain looks correct so far else -1) + shortcut_bias *
    shortcut + (noise_min + noise_range * d^2) * z)`` with s = ``signal`` (``answer_signal`` at the answer
    step, where a PRM is surest) and z a standard normal fixed by the step, so the same step always gets
    the same score. The PRM is imperfect three ways: noise, more of it on hard problems; the trap, which
    it cannot see; a liking for shortcut steps. Text without a step marker scores 0.

    Args:
        signal / answer_signal: log-odds separation between correct-looking and wrong-looking chains at a
            reasoning step / at the answer step.
        shortcut_bias: log-odds bonus of a shortcut step.
        noise_min / noise_range: noise scale ``noise_min + noise_range * d^2``.
        seed: the PRM's own noise stream.
    """

    def __init__(self, *, signal: float = 2.0, answer_signal: float = 3.0, shortcut_bias: float = 1.0,
                 noise_min: float = 0.8, noise_range: float = 2.5, seed: int = 0):
        self.signal, self.answer_signal, self.shortcut_bias = signal, answer_signal, shortcut_bias
        self.noise_min, self.noise_range = noise_min, noise_range
        self.seed = seed
        self._problems = _ProblemTable()
        self._problem_of: dict[str, int] = {}

    def score(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Step scores of every candidate, packed: ``(scores [S] float32, offsets [N + 1] int64)``."""
        if len(problems) != len(step_lists):
            raise ValueError(f"got {len(problems)} problems for {len(step_lists)} step lists")
        counts = np.fromiter(map(len, step_lists), dtype=np.int64, count=len(step_lists))
        known = self._problem_of
        for problem in set(problems).difference(known):
            known[problem] = self._problems.find(problem)
        problem_index = np.fromiter(map(known.__getitem__, problems), dtype=np.int64, count=len(problems))
        codes = _step_codes(list(itertools.chain.from_iterable(step_lists)))
        difficulty = self._problems.columns()[0][np.repeat(problem_index, counts)]
        bits = codes.astype(np.uint64)
        looks_correct = np.where((bits & np.uint64(_LOOKS_CORRECT)) != 0, 1.0, -1.0)
        signal = np.where((bits & np.uint64(_ANSWER)) != 0, self.answer_signal, self.signal)
        with np.errstate(over="ignore"):
            noise = _normal(bits ^ _mix64(np.uint64(self.seed)))
        logit = (signal * looks_correct + self.shortcut_bias * ((bits & np.uint64(_SHORTCUT)) != 0)
                 + (self.noise_min + self.noise_range * difficulty**2) * noise)
        scores = np.where(codes >= 0, 1.0 / (1.0 + np.exp(-logit)), 0.0).astype(np.float32)
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return torch.from_numpy(scores), torch.from_numpy(offsets)
