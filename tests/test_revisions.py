"""Sequential revisions against a plain-Python implementation; verifier-free voting; the outcome-verifier path."""

from __future__ import annotations

import zlib

import pytest
import torch

from fastsearch.models import reasoning
from fastsearch.search import (
    AggregatedSteps,
    Completion,
    best_of_n,
    default_revision_prompt,
    extract_answer,
    revisions,
)
from fastsearch.seeding import Stream, derive_seed

PROBLEMS = [f"problem {i}" for i in range(5)]


def _hash(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


class RecordingGenerator:
    """Deterministic full attempts keyed by (prompt, seed, occurrence of the prompt in the call); records
    every call's prompts. Answers take few values, so that votes have something to count."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, *, n, stop, temperature, max_tokens, seed):
        self.calls.append(list(prompts))
        seen: dict[str, int] = {}
        out = []
        for prompt in prompts:
            occurrence = seen.get(prompt, 0)
            seen[prompt] = occurrence + 1
            samples = []
            for j in range(n):
                h = _hash(prompt, seed, occurrence * n + j)
                samples.append(Completion(f"work {h % 9973}\n\n\\boxed{{{h % 3}}}", 7, True))
            out.append(samples)
        return out


class OutcomeVerifier:
    """An ORM: a score in eighths (sums are exact in fp32), keyed by (problem, completion); records calls."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def score_completions(self, problems, completions):
        self.calls.append((list(problems), list(completions)))
        return [_score(p, c) for p, c in zip(problems, completions, strict=True)]


def _score(problem: str, completion: str) -> float:
    return (_hash(problem, completion) % 8) / 8


def _bar_prompt(problem, previous):
    return problem + "".join(f" | {attempt}" for attempt in previous)


# -- the plain-Python implementation --------------------------------------------------------------------


def _weighted(answers, scores) -> int:
    """Index of the first member of the answer with the largest score sum (ties: the answer seen first)."""
    totals: dict[str, float] = {}
    for answer, score in zip(answers, scores, strict=True):
        totals[answer] = totals.get(answer, 0.0) + score
    best = max(totals.values())
    winner = next(a for a in totals if totals[a] == best)
    return answers.index(winner)


def _majority(answers) -> int:
    """Index of the first member of the answer that first reaches the top count."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    top, running = max(counts.values()), {}
    for answer in answers:
        running[answer] = running.get(answer, 0) + 1
        if running[answer] == top:
            return answers.index(answer)
    raise AssertionError("unreachable")


def reference_revisions(generator, n, chain_length, history, select, across, prompt, seed):
    """One problem at a time (one generator call per round with its chains): (attempts, chosen) per problem."""
    chains = n // chain_length
    results = []
    for problem in PROBLEMS:
        attempts = [[] for _ in range(chains)]
        for k in range(chain_length):
            prompts = [prompt(problem, attempts[c][max(k - history, 0):] if history else []) for c in range(chains)]
            out = generator.generate(prompts, n=1, stop=None, temperature=0.8, max_tokens=2048,
                                     seed=derive_seed(seed, Stream.GENERATE, k))
            for c in range(chains):
                attempts[c].append(out[c][0].text)
        picks = []
        for c in range(chains):
            latest_first = attempts[c][::-1]
            answers = [extract_answer(t) for t in latest_first]
            if select == "last":
                index = 0
            elif select == "majority":
                index = _majority(answers)
            else:
                index = _weighted(answers, [_score(problem, t) for t in latest_first])
            picks.append(attempts[c][chain_length - 1 - index])
        answers = [extract_answer(t) for t in picks]
        if across == "majority":
            chosen_chain = _majority(answers)
        else:
            chosen_chain = _weighted(answers, [_score(problem, t) for t in picks])
        flat = [t for chain in attempts for t in chain]
        results.append((flat, picks[chosen_chain]))
    return results


@pytest.mark.parametrize("n,chain_length,history", [(8, 4, 4), (8, 4, 2), (6, 3, 1), (4, 1, 4), (4, 4, 0), (6, 6, 9)])
@pytest.mark.parametrize("select,across", [("verifier", "weighted"), ("majority", "majority"), ("last", "weighted"),
                                           ("verifier", "majority")])
def test_revisions_match_plain_python(n, chain_length, history, select, across):
    batched, single = RecordingGenerator(), RecordingGenerator()
    verifier = OutcomeVerifier()
    result = revisions(PROBLEMS, batched, verifier, n=n, chain_length=chain_length, select=select, across=across,
                       revision_prompt=_bar_prompt, history=history, seed=5)
    reference = reference_revisions(single, n, chain_length, history, select, across, _bar_prompt, 5)
    assert result.offsets.tolist() == list(range(0, len(PROBLEMS) * n + 1, n))
    for g, (attempts, chosen) in enumerate(reference):
        assert result.candidates[g * n:(g + 1) * n] == attempts, f"problem {g}"
        assert result.completions[g] == chosen, f"problem {g}"
        assert result.candidates[int(result.chosen[g])] == chosen
        assert result.answers[g] == extract_answer(chosen)
    # every round is one call holding every chain of every problem, with the same prompts as one at a time
    assert len(batched.calls) == chain_length == result.spent.generator_calls
    chains = n // chain_length
    for k, prompts in enumerate(batched.calls):
        assert len(prompts) == len(PROBLEMS) * chains
        assert prompts == [p for g in range(len(PROBLEMS)) for p in single.calls[g * chain_length + k]]
    torch.testing.assert_close(result.scores, torch.tensor(
        [_score(PROBLEMS[i // n], t) for i, t in enumerate(result.candidates)]))


def test_chain_histories_are_the_previous_attempts_in_order_truncated():
    generator = RecordingGenerator()
    result = revisions(PROBLEMS[:2], generator, OutcomeVerifier(), n=6, chain_length=6, history=3,
                       revision_prompt=_bar_prompt, seed=0)
    for g, problem in enumerate(PROBLEMS[:2]):
        attempts = result.candidates[g * 6:(g + 1) * 6]
        for k, prompts in enumerate(generator.calls):
            shown = attempts[max(k - 3, 0):k]
            assert prompts[g] == problem + "".join(f" | {a}" for a in shown)
    assert result.info["chains"] == 1 and result.info["chain_length"] == 6
    # the default template (built for all chains of a round at once) is default_revision_prompt of each chain
    generator = RecordingGenerator()
    result = revisions(PROBLEMS[:3], generator, OutcomeVerifier(), n=8, chain_length=4, history=2, seed=0)
    for g, problem in enumerate(PROBLEMS[:3]):
        for c in range(2):
            attempts = result.candidates[g * 8 + c * 4:g * 8 + c * 4 + 4]
            for k, prompts in enumerate(generator.calls):
                assert prompts[g * 2 + c] == default_revision_prompt(problem, attempts[max(k - 2, 0):k])
    # history=0: every attempt sees the problem alone
    generator = RecordingGenerator()
    revisions(PROBLEMS[:2], generator, OutcomeVerifier(), n=4, chain_length=2, history=0, seed=0)
    assert all(prompt in (PROBLEMS[0] + "\n\n", PROBLEMS[1] + "\n\n") for call in generator.calls for prompt in call)


def test_default_revision_prompt():
    assert default_revision_prompt("What is 2+2?", []) == "What is 2+2?\n\n"
    prompt = default_revision_prompt("What is 2+2?", ["It is 5.", "It is 4."])
    assert prompt.startswith("What is 2+2?\n\nPrevious attempts")
    assert prompt.index("Attempt 1:\nIt is 5.") < prompt.index("Attempt 2:\nIt is 4.")
    assert prompt.endswith("correcting any mistake in the attempts above.\n\n")
    many = default_revision_prompt("p", [str(k) for k in range(70)])
    assert "Attempt 70:\n69" in many


@pytest.mark.parametrize("groups", [1, 3, 7])
@pytest.mark.parametrize("n,chain_length", [(16, 1), (16, 4), (16, 16), (12, 3)])
def test_generator_calls_equal_rounds(groups, n, chain_length):
    generator, verifier = RecordingGenerator(), OutcomeVerifier()
    problems = [f"problem {i}" for i in range(groups)]
    result = revisions(problems, generator, verifier, n=n, chain_length=chain_length, seed=1)
    assert result.spent.generator_calls == len(generator.calls) == chain_length
    assert all(len(call) == groups * n // chain_length for call in generator.calls)
    assert result.spent.verifier_calls == len(verifier.calls) == 1
    assert result.spent.sequences == groups * n and result.spent.generated_tokens == 7 * groups * n
    assert result.info["chain_picks"].shape == (groups * n // chain_length,)


def test_majority_revisions_run_without_a_verifier():
    generator = RecordingGenerator()
    result = revisions(PROBLEMS, generator, None, n=8, chain_length=4, select="majority", seed=2)
    assert result.spent.verifier_calls == 0 and result.spent.scored_completions == 0
    assert torch.isnan(result.scores).all()
    with_verifier = revisions(PROBLEMS, RecordingGenerator(), OutcomeVerifier(), n=8, chain_length=4,
                              select="majority", across="majority", seed=2)
    assert with_verifier.answers == result.answers and with_verifier.spent.verifier_calls == 1
    last = revisions(PROBLEMS, RecordingGenerator(), None, n=8, chain_length=4, select="last", seed=2)
    assert last.spent.verifier_calls == 0 and "across=majority" in last.strategy


def test_same_seed_same_result():
    problems = [p.text for p in reasoning.make_problems(10, seed=0)]
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    options = {"n": 8, "chain_length": 4, "answer_fn": reasoning.extract_answer}
    first = revisions(problems, generator, prm, seed=3, **options)
    again = revisions(problems, generator, prm, seed=3, **options)
    other = revisions(problems, generator, prm, seed=4, **options)
    assert first.candidates == again.candidates and torch.equal(first.chosen, again.chosen)
    assert first.candidates != other.candidates


@pytest.mark.parametrize("overrides,error,match", [
    ({"chain_length": 3}, ValueError, "chain_length must divide n"),
    ({"chain_length": 0}, ValueError, "chain_length must be at least 1"),
    ({"chain_length": 2.0}, TypeError, "chain_length must be an int"),
    ({"history": -1}, ValueError, "history must be at least 0"),
    ({"history": "4"}, TypeError, "history must be an int"),
    ({"n": 0}, ValueError, "n must be at least 1"),
    ({"select": "best"}, ValueError, "select must be one of"),
    ({"across": "max"}, ValueError, "across must be one of"),
    ({"revision_prompt": "template"}, TypeError, "revision_prompt must be callable"),
    ({"revision_prompt": lambda problem, previous: None}, TypeError,
     "revision_prompt must return a str, got NoneType for chain 0 of problem 0"),
    ({"revision_prompt": lambda problem, previous: len(previous) if previous else problem}, TypeError,
     "revision_prompt must return a str, got int"),
    ({"verifier": None}, ValueError, "verifier is None but select='verifier' needs verifier scores"),
    ({"verifier": None, "select": "majority", "across": "weighted"}, ValueError, "across='weighted' needs"),
    ({"verifier": object()}, TypeError, "verifier must have a score"),
    ({"generator": object()}, TypeError, "generator must have a generate"),
    ({"problems": []}, ValueError, "problems is empty"),
    ({"aggregate": "median"}, ValueError, "aggregate must be one of"),
])
def test_bad_input_raises(overrides, error, match):
    options = {"problems": PROBLEMS, "generator": RecordingGenerator(), "verifier": OutcomeVerifier(), "n": 8,
               "chain_length": 4, "seed": 0}
    options.update(overrides)
    with pytest.raises(error, match=match):
        revisions(options.pop("problems"), options.pop("generator"), options.pop("verifier"), **options)


class _BadOrm:
    def __init__(self, returned):
        self.returned = returned

    def score_completions(self, problems, completions):
        return self.returned(len(completions))


@pytest.mark.parametrize("returned,error,match", [
    (lambda count: [0.5] * (count - 1), ValueError, "returned scores of shape"),
    (lambda count: "0.5", TypeError, "must return a sequence of floats or a tensor"),
    (lambda count: [["a"]] * count, TypeError, "one float per completion"),
])
def test_bad_outcome_verifier_output(returned, error, match):
    with pytest.raises(error, match=match):
        revisions(PROBLEMS, RecordingGenerator(), _BadOrm(returned), n=4, chain_length=2, seed=0)


# -- verifier-free self-consistency, deduplicated scoring, step verifiers as ORMs ------------------------


class CountingPRM:
    """The simulated PRM, recording how many step lists each call scored."""

    def __init__(self):
        self.inner, self.sizes = reasoning.SimulatedPRM(), []

    def score(self, problems, step_lists):
        self.sizes.append(len(step_lists))
        return self.inner.score(problems, step_lists)


def test_self_consistency_needs_no_verifier():
    problems = reasoning.make_problems(20, seed=4)
    texts = [p.text for p in problems]
    generator = reasoning.SimulatedGenerator()
    free = best_of_n(texts, generator, None, n=16, vote="majority", seed=0, answer_fn=reasoning.extract_answer)
    assert free.spent.verifier_calls == 0 and free.spent.scored_steps == 0 and torch.isnan(free.scores).all()
    prm = CountingPRM()
    scored = best_of_n(texts, generator, prm, n=16, vote="majority", seed=0, answer_fn=reasoning.extract_answer)
    assert free.answers == scored.answers and free.chosen.tolist() == scored.chosen.tolist()
    assert len(prm.sizes) == 1 and not torch.isnan(scored.scores).any()
    with pytest.raises(ValueError, match="verifier is None: only vote='majority'"):
        best_of_n(texts, generator, None, n=4, vote="weighted")


def test_identical_completions_are_scored_once():
    class Repeating(RecordingGenerator):
        def generate(self, prompts, *, n, **options):
            return [[Completion(f"same\n\n\\boxed{{{j % 2}}}", 3, True) for j in range(n)] for _ in prompts]

    verifier = OutcomeVerifier()
    result = best_of_n(PROBLEMS, Repeating(), verifier, n=6, vote="weighted", seed=0)
    (problems, completions), = verifier.calls
    assert len(completions) == 2 * len(PROBLEMS)
    assert len(set(zip(problems, completions, strict=True))) == len(completions)
    assert result.spent.scored_completions == 2 * len(PROBLEMS)
    expected = [_score(PROBLEMS[i // 6], t) for i, t in enumerate(result.candidates)]
    torch.testing.assert_close(result.scores, torch.tensor(expected))
    class StepCounter:
        sizes: list[int] = []

        def score(self, problems, step_lists):
            self.sizes.append(len(step_lists))
            return [[0.5] * len(steps) for steps in step_lists]

    prm = StepCounter()
    best_of_n(PROBLEMS[:2], Repeating(), prm, n=6, seed=0)
    assert prm.sizes == [4]


def test_step_verifier_serves_as_outcome_verifier():
    problems = [p.text for p in reasoning.make_problems(8, seed=5)]
    generator = reasoning.SimulatedGenerator()
    for aggregate in ("last", "min", "mean"):
        direct = best_of_n(problems, generator, reasoning.SimulatedPRM(), n=8, aggregate=aggregate, seed=1,
                           answer_fn=reasoning.extract_answer)
        wrapped = best_of_n(problems, generator, AggregatedSteps(reasoning.SimulatedPRM(), aggregate=aggregate),
                            n=8, seed=1, answer_fn=reasoning.extract_answer)
        torch.testing.assert_close(direct.scores, wrapped.scores)
        assert direct.answers == wrapped.answers
    orm = AggregatedSteps(reasoning.SimulatedPRM(), aggregate="min")
    via_revisions = revisions(problems, generator, orm, n=8, chain_length=2, seed=1, answer_fn=reasoning.extract_answer)
    assert via_revisions.spent.scored_steps == 0 and via_revisions.spent.scored_completions > 0
    with pytest.raises(ValueError, match="aggregate must be one of"):
        AggregatedSteps(reasoning.SimulatedPRM(), aggregate="median")
    with pytest.raises(TypeError, match="verifier must have a score"):
        AggregatedSteps(object())
    with pytest.raises(ValueError, match="step_delimiter must be a non-empty str"):
        AggregatedSteps(reasoning.SimulatedPRM(), step_delimiter="")
