"""The simulated revision model (fastsearch.models.revision_sim) and the sequential / parallel trade-off it gives."""

from __future__ import annotations

import pytest
import torch

from fastsearch.models import reasoning
from fastsearch.models.revision_sim import RevisionModel
from fastsearch.search import (
    ComputeOptimal,
    default_revision_prompt,
    default_strategies,
    revision_strategies,
    revisions,
)

PROBLEMS = reasoning.make_problems(300, seed=11)
TEXTS = [p.text for p in PROBLEMS]
LEVELS = torch.tensor([p.level for p in PROBLEMS])


def _chain_rightness(generator, n=16, seed=0) -> torch.Tensor:
    """[G, n] bool: which attempts of one chain of n revisions per problem are right."""
    result = revisions(TEXTS, generator, None, n=n, chain_length=n, select="last", seed=seed,
                       answer_fn=reasoning.extract_answer)
    return torch.tensor([a == PROBLEMS[i // n].answer for i, a in enumerate(result.candidate_answers)]).view(-1, n)


def test_revisions_help_easy_problems_more_and_break_right_answers():
    right = _chain_rightness(reasoning.SimulatedGenerator())
    first, revised = right[:, 0].float(), right[:, 4:].float().mean(-1)
    easy, hard = LEVELS <= 2, LEVELS == 4
    gain_easy = revised[easy].mean() - first[easy].mean()
    assert gain_easy > 0.08
    assert revised[hard].mean() - first[hard].mean() < gain_easy
    previous, following = right[:, :-1], right[:, 1:]
    broken = float((previous & ~following).sum() / previous.sum())
    assert 0.3 < broken < 0.46  # the paper: about 38 % of right answers turn wrong in their chains


def test_without_the_revision_model_earlier_attempts_change_nothing():
    right = _chain_rightness(reasoning.SimulatedGenerator(revision=None))
    first, revised = right[:, 0].float().mean(), right[:, 4:].float().mean()
    assert abs(float(revised - first)) < 0.05
    with pytest.raises(TypeError, match="revision must be a RevisionModel or None"):
        reasoning.SimulatedGenerator(revision={"gain": 0.5})
    with pytest.raises(ValueError, match="gain must be <= 1"):
        RevisionModel(gain=1.5)


def test_hard_revisions_repeat_wrong_answers():
    """Anchoring: on hard problems a revision of a wrong attempt often gives the same wrong answer."""
    n = 8
    result = revisions(TEXTS, reasoning.SimulatedGenerator(), None, n=n, chain_length=n, select="last", seed=1,
                       answer_fn=reasoning.extract_answer)
    answers = [result.candidate_answers[g * n:(g + 1) * n] for g in range(len(TEXTS))]

    def repeat_rate(level):
        pairs = [(a, b) for g, chain in enumerate(answers) if PROBLEMS[g].level == level
                 for a, b in zip(chain, chain[1:], strict=False) if a != PROBLEMS[g].answer]
        return sum(a == b for a, b in pairs) / len(pairs)

    assert repeat_rate(4) > repeat_rate(2) + 0.15


def test_a_revision_prompt_continues_step_by_step():
    """Steps generated one at a time after a revision prompt carry on the revised attempt."""
    problem = PROBLEMS[0]
    generator = reasoning.SimulatedGenerator()
    (first,), = generator.generate([problem.text + "\n\n"], n=1, stop=None, seed=0)
    prompt = default_revision_prompt(problem.text, [first.text])
    (step,), = generator.generate([prompt], n=1, stop=["\n\n"], seed=0)
    assert step.text.startswith("step 1 <")
    (rest,), = generator.generate([prompt + step.text], n=1, stop=None, seed=0)
    assert rest.finished and rest.text.count("\n\n") == problem.num_steps - 1
    with pytest.raises(ValueError, match="already ends with its answer"):
        generator.generate([problem.text + "\n\n" + first.text], n=1, stop=None, seed=0)


def test_sequential_parallel_tradeoff_depends_on_difficulty():
    """Snell et al. sec. 6: easy problems do best with the most sequential ratio, hard ones with a mix."""
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()

    def accuracy(n, chain_length):
        result = revisions(TEXTS, generator, prm, n=n, chain_length=chain_length, seed=0,
                           answer_fn=reasoning.extract_answer)
        return reasoning.correct(result.answers, PROBLEMS).float()

    easy, hard = LEVELS <= 2, LEVELS == 4
    # at a small budget, easy problems gain from revising and the verifier is reliable
    assert accuracy(4, 4)[easy].mean() > accuracy(4, 1)[easy].mean() + 0.03
    # hard ones need several chains (a revision often repeats a wrong answer) and some revising
    mixed, parallel, sequential = (accuracy(16, length)[hard].mean() for length in (4, 1, 16))
    assert mixed > max(parallel, sequential) + 0.05


def test_compute_optimal_searches_the_ratio():
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    strategies = revision_strategies(max_chain_length=16)
    assert [s.name for s in strategies] == ["revisions(L=1)", "revisions(L=2)", "revisions(L=4)", "revisions(L=8)",
                                            "revisions(L=16)"]
    assert strategies[3].settings(4) is None and strategies[2].settings(16)["chain_length"] == 4
    policy = ComputeOptimal(strategies, bins=3, options={"vote": "weighted", "answer_fn": reasoning.extract_answer})
    policy.fit(TEXTS[:120], [p.answer for p in PROBLEMS[:120]], generator, prm, budgets=(4, 16), seed=0)
    chosen = policy.policy()
    assert set(chosen) == {4, 16} and all(name.startswith("revisions(L=") for names in chosen.values()
                                          for name in names)
    result = policy.search(TEXTS[120:180], generator, prm, budget=16, seed=1)
    assert len(result.answers) == 60 and set(result.info["strategy"]) <= {s.name for s in strategies}
    assert result.spent.generator_calls > 1
    with pytest.raises(ValueError, match="options must not set 'chain_length'"):
        ComputeOptimal(strategies, options={"chain_length": 2})
    with pytest.raises(ValueError, match="select must be one of"):
        revision_strategies(select="best")


def test_compute_optimal_combines_revisions_with_prm_search():
    """One policy over PRM searches and revision ratios; each search gets only the options it takes."""
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    strategies = default_strategies(max_steps=reasoning.MAX_STEPS + 2) + revision_strategies(max_chain_length=4)
    policy = ComputeOptimal(strategies, bins=2, options={"vote": "weighted", "answer_fn": reasoning.extract_answer,
                                                         "across": "majority"})
    policy.fit(TEXTS[:60], [p.answer for p in PROBLEMS[:60]], generator, prm, budgets=(4,), seed=0)
    names = [s.name for s in strategies]
    assert policy.accuracy.shape == (1, 2, len(names)) and bool((policy.accuracy[0, :, names.index("dvts(M=4)")]
                                                                 >= 0).all())
    assert bool((policy.accuracy[0, :, names.index("revisions(L=4)")] >= 0).all())
    result = policy.search(TEXTS[60:90], generator, prm, budget=4, seed=0)
    assert set(result.info["strategy"]) <= set(names) and len(result.answers) == 30
