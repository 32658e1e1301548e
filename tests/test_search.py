"""LLM search algorithms: batching, results and accounting, determinism, bad input, compute-optimal policy."""

from __future__ import annotations

import gc
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_search_reference import DELIMITER, PROBLEMS, FakeGenerator, FakeVerifier

from fastsearch.models import reasoning
from fastsearch.search import (
    Completion,
    ComputeOptimal,
    SearchResult,
    Strategy,
    beam_search,
    best_of_n,
    default_strategies,
    dvts,
    extract_answer,
    particle_filter,
)
from fastsearch.seeding import Stream, derive_seed

SIM_PROBLEMS = reasoning.make_problems(12, seed=3)
SIM_TEXTS = [p.text for p in SIM_PROBLEMS]
SIM = {"answer_fn": reasoning.extract_answer}


class FixedLength:
    """Every chain takes exactly ``length`` steps, the last one ends with EOS; calls are counted."""

    def __init__(self, length: int):
        self.length = length
        self.calls = 0

    def generate(self, prompts, *, n, stop, temperature, max_tokens, seed):
        self.calls += 1
        out = []
        for i, prompt in enumerate(prompts):
            depth = prompt.count(DELIMITER) - 1
            samples = []
            for j in range(n):
                steps = [f"step {d} of {i}.{j}" for d in range(depth, self.length if stop is None else depth + 1)]
                done = depth + len(steps) >= self.length
                samples.append(Completion(DELIMITER.join(steps) + ("" if done else DELIMITER), 4 * len(steps), done))
            out.append(samples)
        return out


SEARCHES = {
    "best_of_n": lambda problems, g, v, **kw: best_of_n(problems, g, v, n=8, **kw),
    "beam_search": lambda problems, g, v, **kw: beam_search(problems, g, v, n=8, beam_width=2, max_steps=12, **kw),
    "dvts": lambda problems, g, v, **kw: dvts(problems, g, v, n=8, beam_width=4, max_steps=12, **kw),
    "particle_filter": lambda problems, g, v, **kw: particle_filter(problems, g, v, n=8, max_steps=12, **kw),
}


@pytest.mark.parametrize("name", list(SEARCHES))
@pytest.mark.parametrize("num_problems", [1, 9])
def test_one_generator_and_verifier_call_per_step(name, num_problems):
    generator, verifier = FixedLength(5), FakeVerifier()
    result = SEARCHES[name]([f"p{i}" for i in range(num_problems)], generator, verifier, seed=0)
    steps = 1 if name == "best_of_n" else 5
    assert generator.calls == result.spent.generator_calls == steps
    assert verifier.calls == result.spent.verifier_calls == steps


@pytest.mark.parametrize("name", list(SEARCHES))
def test_batched_equals_one_problem_at_a_time(name):
    """The simulated generator samples by prompt, so a problem's search cannot depend on its batch."""
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    batched = SEARCHES[name](SIM_TEXTS, generator, prm, seed=4, vote="weighted", **SIM)
    # resampling draws problem g's uniforms at stream positions g * n ...: only problem 0 matches alone
    for g in (0,) if name == "particle_filter" else (0, 5, 11):
        alone = SEARCHES[name]([SIM_TEXTS[g]], generator, prm, seed=4, vote="weighted", **SIM)
        start, end = int(batched.offsets[g]), int(batched.offsets[g + 1])
        assert alone.candidates == batched.candidates[start:end]
        torch.testing.assert_close(alone.scores, batched.scores[start:end])
        assert alone.answers == [batched.answers[g]]
        assert int(alone.spent.tokens_per_problem[0]) == int(batched.spent.tokens_per_problem[g])


@pytest.mark.parametrize("name", list(SEARCHES))
def test_result_and_spent(name):
    result = SEARCHES[name](SIM_TEXTS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), seed=1, **SIM)
    assert isinstance(result, SearchResult)
    groups = len(SIM_TEXTS)
    sizes = result.offsets[1:] - result.offsets[:-1]
    expected = {"best_of_n": 8, "particle_filter": 8, "dvts": 2}
    if name in expected:
        assert bool((sizes == expected[name]).all())
    else:
        assert bool((sizes >= 1).all()) and bool((sizes <= 8).all())
    assert len(result.candidates) == len(result.candidate_answers) == result.scores.numel() == int(result.offsets[-1])
    assert len(result.completions) == len(result.answers) == result.chosen.numel() == groups
    chosen = result.chosen.tolist()
    assert all(result.offsets[g] <= chosen[g] < result.offsets[g + 1] for g in range(groups))
    assert [result.candidates[i] for i in chosen] == result.completions
    assert result.answers == [reasoning.extract_answer(c) for c in result.completions]
    assert all(a.isdigit() for a in result.answers)
    spent = result.spent
    assert spent.generated_tokens == int(spent.tokens_per_problem.sum()) > 0
    assert bool((spent.tokens_per_problem > 0).all())
    assert spent.sequences >= 8 * groups and spent.scored_steps >= spent.sequences
    assert min(spent.generator_seconds, spent.verifier_seconds, spent.overhead_seconds) >= 0
    assert math.isclose(spent.generator_seconds + spent.verifier_seconds + spent.overhead_seconds,
                        spent.wall_seconds, rel_tol=1e-6)
    assert result.strategy.startswith(name)
    problem, answer, score = result.candidates_of(0)[0]
    assert problem == result.candidates[0] and answer == result.candidate_answers[0]
    assert score == pytest.approx(float(result.scores[0]))


@pytest.mark.parametrize("name", list(SEARCHES))
def test_seeded_runs_repeat(name):
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    first = SEARCHES[name](SIM_TEXTS, generator, prm, seed=7, **SIM)
    again = SEARCHES[name](SIM_TEXTS, generator, prm, seed=7, **SIM)
    other = SEARCHES[name](SIM_TEXTS, generator, prm, seed=8, **SIM)
    assert first.candidates == again.candidates and torch.equal(first.scores, again.scores)
    assert first.candidates != other.candidates
    torch.manual_seed(0)
    unseeded = SEARCHES[name](SIM_TEXTS, generator, prm, **SIM)
    torch.manual_seed(0)
    assert SEARCHES[name](SIM_TEXTS, generator, prm, **SIM).candidates == unseeded.candidates


def test_best_of_n_votes_follow_the_scores():
    """Weighted voting beats argmax and majority on the simulated task (the PRM knows more than the count)."""
    problems = reasoning.make_problems(60, seed=9)
    texts = [p.text for p in problems]
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    accuracy = {vote: reasoning.accuracy(best_of_n(texts, generator, prm, n=32, vote=vote, seed=0, **SIM).answers,
                                         problems) for vote in ("none", "majority", "weighted")}
    assert accuracy["weighted"] >= max(accuracy["none"], accuracy["majority"])


def test_nan_scores_are_never_picked():
    class NanForAnswerZero(FakeVerifier):
        def score(self, problems, step_lists):
            rows = super().score(problems, step_lists)
            return [[math.nan if step == "answer 0" else s for s, step in zip(row, steps, strict=True)]
                    for row, steps in zip(rows, step_lists, strict=True)]

    for vote in ("none", "weighted"):
        result = best_of_n(PROBLEMS, FakeGenerator(), NanForAnswerZero(), n=9, vote=vote, seed=0, max_tokens=64)
        assert all(answer != "answer 0" for answer in result.answers)


def test_prompt_fn_and_progress(capsys):
    generator = FakeGenerator()
    result = beam_search(PROBLEMS[:2], generator, FakeVerifier(), n=4, beam_width=2, max_steps=4, seed=0,
                         prompt_fn=lambda p: f"{p}{DELIMITER}", progress=True, max_tokens=64)
    assert all(prompt.startswith(PROBLEMS[0]) or prompt.startswith(PROBLEMS[1])
               for prompts, *_ in generator.calls for prompt in prompts)
    assert "beam_search" in capsys.readouterr().err
    assert result.completions[0] == result.candidates[int(result.chosen[0])]


def test_search_leaves_threads_and_collector_alone():
    """A search changes no process-wide state: the models (and every other thread) see the collector and
    torch's thread count as the caller left them, also when the search fails."""
    threads, seen = torch.get_num_threads(), []

    class Recording(FakeVerifier):
        def score(self, problems, step_lists):
            seen.append((torch.get_num_threads(), gc.isenabled()))
            return super().score(problems, step_lists)

    beam_search(PROBLEMS, FakeGenerator(), Recording(), n=4, beam_width=2, max_steps=3, seed=0, max_tokens=64)
    assert seen and all(entry == (threads, True) for entry in seen)
    assert torch.get_num_threads() == threads and gc.isenabled()
    with pytest.raises(ValueError, match="score lists"):
        best_of_n(PROBLEMS, FakeGenerator(), _Wrong("too few lists"), n=2, seed=0, max_tokens=64)
    assert torch.get_num_threads() == threads and gc.isenabled()


def test_extract_answer():
    assert extract_answer("so \\boxed{\\frac{1}{2}} is it\n\nthe end") == "\\frac{1}{2}"
    assert extract_answer("step one\n\n  42  \n") == "42"
    assert extract_answer("") == ""


# -- bad input ------------------------------------------------------------------------------------------


def _run(**overrides):
    options = {"problems": PROBLEMS, "generator": FakeGenerator(), "verifier": FakeVerifier(), "n": 4,
               "beam_width": 2, "max_steps": 3, "max_tokens": 64, "seed": 0}
    options.update(overrides)
    problems, generator, verifier = options.pop("problems"), options.pop("generator"), options.pop("verifier")
    return beam_search(problems, generator, verifier, **options)


@pytest.mark.parametrize("overrides,error,match", [
    ({"n": 6, "beam_width": 4}, ValueError, "n must be divisible by beam_width"),
    ({"problems": []}, ValueError, "problems is empty"),
    ({"problems": "one problem"}, TypeError, "problems must be a sequence of strings"),
    ({"problems": ["ok", 3]}, TypeError, r"problems\[1\] must be a str"),
    ({"n": 0}, ValueError, "n must be at least 1"),
    ({"n": 4.0}, TypeError, "n must be an int"),
    ({"max_steps": 0}, ValueError, "max_steps must be at least 1"),
    ({"lookahead": -1}, ValueError, "lookahead must be at least 0"),
    ({"lookahead": "1"}, TypeError, "lookahead must be an int"),
    ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    ({"temperature": "hot"}, TypeError, "temperature must be a float"),
    ({"vote": "best"}, ValueError, "vote must be one of"),
    ({"aggregate": "median"}, ValueError, "aggregate must be one of"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"step_delimiter": ""}, ValueError, "step_delimiter"),
    ({"step_delimiter": 3}, TypeError, "step_delimiter must be a str"),
    ({"generator": object()}, TypeError, "generator must have a generate"),
    ({"verifier": object()}, TypeError, "verifier must have a score"),
    ({"answer_fn": "last line"}, TypeError, "answer_fn must be callable"),
    ({"prompt_fn": lambda p: None}, TypeError, "prompt_fn must return a str"),
])
def test_bad_input_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        _run(**overrides)


def test_particle_filter_bad_input():
    with pytest.raises(ValueError, match="resample must be one of"):
        particle_filter(PROBLEMS, FakeGenerator(), FakeVerifier(), n=4, resample="greedy")
    with pytest.raises(ValueError, match="ess_threshold must be <= 1"):
        particle_filter(PROBLEMS, FakeGenerator(), FakeVerifier(), n=4, ess_threshold=1.5)
    with pytest.raises(TypeError, match="ess_threshold must be a float"):
        particle_filter(PROBLEMS, FakeGenerator(), FakeVerifier(), n=4, ess_threshold="half")


_SEARCH_FUNCTIONS = {"best_of_n": best_of_n, "beam_search": beam_search, "dvts": dvts,
                     "particle_filter": particle_filter}
_SMALLEST = {"best_of_n": {"n": 2}, "beam_search": {"n": 2, "beam_width": 2, "max_steps": 2},
             "dvts": {"n": 2, "beam_width": 2, "max_steps": 2}, "particle_filter": {"n": 2, "max_steps": 2}}


@pytest.mark.parametrize("name,option", [(name, option) for name, options in _SMALLEST.items()
                                         for option in [*options, "max_tokens"]])
def test_counts_are_checked_alike(name, option):
    """Every count of every search: TypeError for a non-int (a str, a bool), ValueError below 1; numpy ints pass."""
    def call(value):
        options = {**_SMALLEST[name], "max_tokens": 64, "seed": 0, option: value}
        return _SEARCH_FUNCTIONS[name](PROBLEMS, FakeGenerator(), FakeVerifier(), **options)

    with pytest.raises(TypeError, match=f"{option} must be an int, got str"):
        call("3")
    with pytest.raises(TypeError, match=f"{option} must be an int, got bool"):
        call(True)
    with pytest.raises(ValueError, match=f"{option} must be at least 1, got 0"):
        call(0)
    valid = _SMALLEST[name].get(option, 64)
    assert call(np.int64(valid)).candidates == call(valid).candidates


class _Wrong:
    """A verifier (or generator) that breaks the protocol in one way."""

    def __init__(self, how: str):
        self.how = how
        self.inner_generator, self.inner_verifier = FakeGenerator(), FakeVerifier()

    def score(self, problems, step_lists):
        rows = self.inner_verifier.score(problems, step_lists)
        if self.how == "too few lists":
            return rows[:-1]
        if self.how == "short list":
            return [rows[0][:-1]] + rows[1:]
        flat = torch.tensor([s for row in rows for s in row])
        if self.how == "packed total":
            return flat, torch.arange(len(rows) + 1)
        if self.how == "packed counts":
            counts = [len(row) for row in rows]
            counts[0], counts[1] = counts[0] + 1, counts[1] - 1
            return flat, torch.tensor([0] + counts).cumsum(0)
        return 0.5

    def generate(self, prompts, **options):
        out = self.inner_generator.generate(prompts, **options)
        if self.how == "too few prompts":
            return out[:-1]
        if self.how == "too few samples":
            return [out[0][:-1]] + out[1:]
        return [[(c.text, c.num_tokens, c.finished) for c in row] for row in out]


@pytest.mark.parametrize("how,error,match", [
    ("too few lists", ValueError, "returned 4 score lists for 5 candidates"),
    ("short list", ValueError, "scores for candidate 0"),
    ("packed total", ValueError, "offsets 0 ... 5 for 21 scores"),
    ("packed counts", ValueError, "returned 4 scores for candidate 0, which has 3 steps"),
    ("a number", TypeError, "verifier.score must return"),
])
def test_verifier_returning_the_wrong_scores_raises(how, error, match):
    with pytest.raises(error, match=match):
        best_of_n(PROBLEMS, FakeGenerator(), _Wrong(how), n=1, seed=0, max_tokens=64)


@pytest.mark.parametrize("how,error,match", [
    ("too few prompts", ValueError, "returned 4 lists for 5 prompts"),
    ("too few samples", ValueError, "completions for prompt 0, expected n=3"),
    ("plain tuples", TypeError, "Completion"),
])
def test_generator_breaking_the_protocol_raises(how, error, match):
    with pytest.raises(error, match=match):
        best_of_n(PROBLEMS, _Wrong(how), FakeVerifier(), n=3, seed=0, max_tokens=64)


# -- compute-optimal ------------------------------------------------------------------------------------


def _fitted(**options) -> ComputeOptimal:
    val = reasoning.make_problems(40, seed=5)
    policy = ComputeOptimal(default_strategies(max_steps=10), bins=3, probe_n=2,
                            options={"vote": "weighted", **SIM, **options})
    return policy.fit([p.text for p in val], [p.answer for p in val], reasoning.SimulatedGenerator(),
                      reasoning.SimulatedPRM(), budgets=(4, 16), seed=0)


def test_compute_optimal_fits_and_dispatches():
    policy = _fitted()
    assert set(policy.policy()) == {4, 16} and all(len(v) == 3 for v in policy.policy().values())
    report = policy.report()
    assert report.startswith("budget") and all(name in report for names in policy.policy().values() for name in names)
    # the chosen strategy has the best validation accuracy of its bin
    best = policy.accuracy.max(-1).values
    assert torch.equal(policy.accuracy.gather(-1, policy.choice[..., None]).squeeze(-1), best)
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    result = policy.search(SIM_TEXTS, generator, prm, budget=16, seed=3)
    assert result.strategy == "compute_optimal(budget=16)"
    names = result.info["strategy"]
    assert len(names) == len(SIM_TEXTS) and set(names) <= {s.name for s in policy.strategies}
    # every problem's candidates are those of its strategy run on it alone (the simulation is batch-independent)
    for g in (0, 4, 9):
        s = next(i for i, strategy in enumerate(policy.strategies) if strategy.name == names[g])
        strategy = policy.strategies[s]
        alone = strategy.search([SIM_TEXTS[g]], generator, prm, seed=derive_seed(3, Stream.SEARCH, s),
                                **strategy.settings(16), **policy.options)
        start, end = int(result.offsets[g]), int(result.offsets[g + 1])
        assert result.candidates[start:end] == alone.candidates
        assert result.answers[g] == alone.answers[0]
        assert result.completions[g] == result.candidates[int(result.chosen[g])]
    # the difficulty estimate is paid for: its call, tokens and scores are in what the search spent
    difficulty, probe = policy.difficulty(SIM_TEXTS, generator, prm, seed=derive_seed(3, Stream.PROBE))
    torch.testing.assert_close(difficulty, result.info["difficulty"])
    searches = [policy.strategies[s] for s in sorted({[t.name for t in policy.strategies].index(n) for n in names})]
    assert result.spent.generator_calls > probe.generator_calls + len(searches) - 1
    assert bool((result.spent.tokens_per_problem > probe.tokens_per_problem).all())
    assert result.spent.generated_tokens == int(result.spent.tokens_per_problem.sum())


def test_compute_optimal_bad_use():
    policy = ComputeOptimal()
    with pytest.raises(RuntimeError, match="not fitted"):
        policy.search(SIM_TEXTS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), budget=4)
    with pytest.raises(ValueError, match="options must not set 'n'"):
        ComputeOptimal(options={"n": 4})
    with pytest.raises(TypeError, match="strategies"):
        ComputeOptimal([best_of_n])
    with pytest.raises(TypeError, match="bins must be an int"):
        ComputeOptimal(bins="3")
    with pytest.raises(ValueError, match="probe_n must be at least 1"):
        ComputeOptimal(probe_n=0)
    with pytest.raises(TypeError, match=r"budgets\[1\] must be an int"):
        ComputeOptimal().fit(SIM_TEXTS, ["1"] * len(SIM_TEXTS), reasoning.SimulatedGenerator(),
                             reasoning.SimulatedPRM(), budgets=(4, "16"))
    with pytest.raises(TypeError, match="seed must be an int"):
        ComputeOptimal().fit(SIM_TEXTS, ["1"] * len(SIM_TEXTS), reasoning.SimulatedGenerator(),
                             reasoning.SimulatedPRM(), seed=None)
    fitted = _fitted()
    with pytest.raises(ValueError, match="budget must be one of the fitted budgets"):
        fitted.search(SIM_TEXTS, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), budget=8)


def test_strategy_settings_follow_the_budget():
    strategies = {s.name: s for s in default_strategies(max_steps=7)}
    assert strategies["beam_search(M=sqrt n)"].settings(64) == {"n": 64, "beam_width": 8, "max_steps": 7}
    assert strategies["beam_search(M=sqrt n)"].settings(32)["beam_width"] == 4
    assert strategies["beam_search(M=4)"].settings(6) is None
    custom = Strategy("bon8", best_of_n, lambda budget: {"n": budget})
    assert custom.settings(8) == {"n": 8}


def test_search_package_imports_no_embedded_model():
    """The layers point one way: fastsearch.models (and the demos) build on fastsearch.search, never back."""
    code = ("import sys, fastsearch.search\n"
            "assert not [m for m in sys.modules if m.startswith(('fastsearch.models', 'fastsearch.demos'))]\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
