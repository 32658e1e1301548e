"""The simulated reasoning task: determinism, the error model, the PRM's signal and bias, the search curves."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastsearch.demos import llm as llm_demo
from fastsearch.models import reasoning
from fastsearch.search import beam_search, best_of_n

DELIMITER = "\n\n"


def _code(step: str) -> int:
    return int(step[-17:-1], 16)


def test_problems_are_deterministic_and_cover_the_levels():
    problems = reasoning.make_problems(50, seed=0)
    assert problems == reasoning.make_problems(50, seed=0)
    assert problems != reasoning.make_problems(50, seed=1)
    assert Counter(p.level for p in problems) == {level: 10 for level in range(1, 6)}
    assert all(3 <= p.num_steps <= reasoning.MAX_STEPS for p in problems)
    by_level = [sum(p.num_steps for p in problems if p.level == level) / 10 for level in (1, 5)]
    assert by_level[1] > by_level[0] + 3  # harder problems take more steps
    assert 10 < sum(p.trap == 0 for p in problems) < 40
    assert all(p.text.startswith("Simulated problem") and "(sim: " in p.text for p in problems)
    with pytest.raises(ValueError, match="count must be at least 1"):
        reasoning.make_problems(0)
    with pytest.raises(TypeError, match="count must be an int"):
        reasoning.make_problems("3")


def test_generator_is_deterministic_and_batch_independent():
    generator = reasoning.SimulatedGenerator()
    prompts = [p.text + DELIMITER for p in reasoning.make_problems(5, seed=2)]
    first = generator.generate(prompts, n=3, stop=None, seed=1)
    assert first == generator.generate(prompts, n=3, stop=None, seed=1)
    assert first != generator.generate(prompts, n=3, stop=None, seed=2)
    assert generator.generate([prompts[2]], n=3, stop=None, seed=1)[0] == first[2]
    assert len({c.text for c in first[0]}) == 3
    twice = generator.generate([prompts[0], prompts[0]], n=1, stop=[DELIMITER], seed=1)
    assert twice[0] != twice[1]  # a repeated prompt is sampled again, not copied
    greedy = generator.generate([prompts[0], prompts[0]], n=2, stop=None, temperature=0.0, seed=1)
    assert greedy == generator.generate([prompts[0], prompts[0]], n=2, stop=None, temperature=0.0, seed=9)
    assert len({c.text for row in greedy for c in row}) == 1


def test_steps_continue_to_the_answer():
    problem = reasoning.make_problems(3, seed=4)[2]
    generator = reasoning.SimulatedGenerator()
    prompt = problem.text + DELIMITER
    for k in range(1, problem.num_steps + 1):
        (step,), = generator.generate([prompt], n=1, stop=[DELIMITER], seed=k)
        assert step.text.startswith(f"step {k} <") and step.text.endswith(DELIMITER) and not step.finished
        assert 12 <= step.num_tokens <= 80
        prompt += step.text
    (answer,), = generator.generate([prompt], n=1, stop=[DELIMITER], seed=0)
    assert answer.finished and answer.text.startswith("answer ") and not answer.text.endswith(DELIMITER)
    assert reasoning.extract_answer(prompt + answer.text).isdigit()
    with pytest.raises(ValueError, match="already ends with its answer"):
        generator.generate([prompt + answer.text], n=1, stop=None, seed=0)
    (full,), = generator.generate([problem.text + DELIMITER], n=1, stop=None, seed=3)
    assert full.finished and full.text.count(DELIMITER) == problem.num_steps
    (cut,), = generator.generate([problem.text + DELIMITER], n=1, stop=None, max_tokens=100, seed=3)
    assert not cut.finished and cut.num_tokens == 100 and not cut.text.endswith(DELIMITER)
    assert reasoning.extract_answer(cut.text) == ""
    (empty,), = generator.generate([problem.text + DELIMITER], n=1, stop=[DELIMITER], max_tokens=5, seed=3)
    assert empty.text == "" and not empty.finished


def _pass_rate(problems, temperature: float, samples: int = 48, generator=None) -> float:
    generator = generator or reasoning.SimulatedGenerator()
    outputs = generator.generate([p.text + DELIMITER for p in problems], n=samples, stop=None,
                                 temperature=temperature, seed=0)
    right = [reasoning.extract_answer(c.text) == p.answer for p, row in zip(problems, outputs, strict=True)
             for c in row]
    return sum(right) / len(right)


def test_errors_grow_with_difficulty_and_temperature():
    problems = reasoning.make_problems(100, seed=6)
    by_level = [_pass_rate([p for p in problems if p.level == level], 0.8) for level in range(1, 6)]
    assert all(easier > harder for easier, harder in zip(by_level[:-1], by_level[1:], strict=True))
    assert by_level[0] > 0.5 and by_level[-1] < 0.05
    cold, usual, hot = (_pass_rate(problems, temperature) for temperature in (0.2, 0.8, 1.4))
    assert cold > usual + 0.1 and usual > hot + 0.05


def test_prm_signal_noise_and_bias():
    problems = reasoning.make_problems(60, seed=7)
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    outputs = generator.generate([p.text + DELIMITER for p in problems], n=32, stop=None, seed=0)
    flat = [(p, c) for p, row in zip(problems, outputs, strict=True) for c in row]
    steps = [c.text.split(DELIMITER) for _, c in flat]
    scores, offsets = prm.score([p.text for p, _ in flat], steps)
    again, _ = prm.score([p.text for p, _ in flat], steps)
    assert torch.equal(scores, again) and offsets[-1] == scores.numel()
    last = scores[offsets[1:] - 1]
    answers = [reasoning.extract_answer(c.text) for _, c in flat]
    right = torch.tensor([a == p.answer for a, (p, _) in zip(answers, flat, strict=True)])
    trapped = torch.tensor([a == str(int(p.answer) + 1) and bool(_code(s[-1]) & reasoning._LOOKS_CORRECT)
                            for a, (p, _), s in zip(answers, flat, steps, strict=True)])
    wrong = ~right & ~trapped
    assert last[right].mean() > last[wrong].mean() + 0.5  # the signal
    assert bool((last[wrong][:, None] > last[right][None, :]).any())  # the noise
    assert trapped.sum() > 10 and last[trapped].mean() > last[wrong].mean() + 0.5  # the blind spot
    flat_steps = [step for row in steps for step in row]
    shortcut = torch.tensor([bool(_code(s) & reasoning._SHORTCUT) for s in flat_steps])
    looks = torch.tensor([bool(_code(s) & reasoning._LOOKS_CORRECT) for s in flat_steps])
    assert scores[shortcut & looks].mean() > scores[~shortcut & looks].mean() + 0.03  # the bias
    assert prm.score([problems[0].text], [["not a simulated step"]])[0].tolist() == [0.0]


def test_generator_cost_is_slept(monkeypatch):
    slept = []
    monkeypatch.setattr(reasoning.time, "sleep", slept.append)
    generator = reasoning.SimulatedGenerator(cost_per_call=1.0, cost_per_token=1e-3)
    outputs = generator.generate([p.text + DELIMITER for p in reasoning.make_problems(4)], n=2, stop=None, seed=0)
    tokens = sum(c.num_tokens for row in outputs for c in row)
    assert len(slept) == 1 and 1.0 + 1e-3 * tokens - 0.5 < slept[0] <= 1.0 + 1e-3 * tokens
    with pytest.raises(ValueError, match="cost_per_call must be >= 0"):
        reasoning.SimulatedGenerator(cost_per_call=-1.0)
    with pytest.raises(ValueError, match="cost_per_token must be >= 0"):
        reasoning.SimulatedGenerator(cost_per_token=-1e-6)


def test_search_curves_have_snells_shape():
    """Beam search ahead at small budgets and on hard problems; best-of-N catches up at large budgets on easy
    problems, where strong beam search over-exploits the PRM."""
    problems = reasoning.make_problems(100, seed=8)
    texts, levels = [p.text for p in problems], torch.tensor([p.level for p in problems])
    generator, prm = reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()
    options = {"vote": "weighted", "answer_fn": reasoning.extract_answer, "seed": 0}

    def right(result):
        return reasoning.correct(result.answers, problems).float()

    bon_small = right(best_of_n(texts, generator, prm, n=4, **options))
    beam_small = right(beam_search(texts, generator, prm, n=4, beam_width=4, max_steps=10, **options))
    assert beam_small.mean() > bon_small.mean() + 0.05
    hard = levels >= 4
    bon = right(best_of_n(texts, generator, prm, n=16, **options))
    beam = right(beam_search(texts, generator, prm, n=16, beam_width=4, max_steps=10, **options))
    assert beam[hard].mean() > bon[hard].mean() + 0.15
    easy = levels <= 2
    bon_large = right(best_of_n(texts, generator, prm, n=64, **options))
    beam_large = right(beam_search(texts, generator, prm, n=64, beam_width=8, max_steps=10, **options))
    assert bon_large[easy].mean() >= beam_large[easy].mean() + 0.05


def test_demo_quick(tmp_path, capsys):
    summary = llm_demo.run(tmp_path, quick=True, progress=False)
    assert (tmp_path / "llm_scaling.png").stat().st_size > 10_000
    assert summary["budgets"] == [4, 16]
    assert set(summary["accuracy"]) == {"best_of_n", "beam_search(M=4)", "beam_search(M=sqrt n)", "dvts(M=4)",
                                        "compute_optimal"}
    assert all(len(v) == 2 for rows in summary["accuracy"].values() for v in rows.values())
    assert set(summary["policy"]) == {4, 16}
    printed = capsys.readouterr().out
    assert "a simulation, not an LLM" in printed and "compute-optimal" in printed
    tradeoff = summary["tradeoff"]
    assert (tmp_path / "llm_tradeoff.png").stat().st_size > 10_000
    assert set(tradeoff["ratios"]) == {1, 2, 4, 8, 16} and tradeoff["budgets"] == [4, 16]
    assert all(len(values) == 2 for rows in tradeoff["ratios"].values() for values in rows.values())
    assert all(length <= budget for values in tradeoff["best_ratio"].values()
               for length, budget in zip(values, [4, 16], strict=True))
    assert 0.0 < tradeoff["flip_rate"] < 1.0 and len(tradeoff["compute_optimal"]["levels"]) == 2
    pretraining = summary["pretraining"]
    assert (tmp_path / "llm_pretraining.png").stat().st_size > 10_000
    assert len(pretraining["winner"]) == 3 and pretraining["multiples"][0] > pretraining["multiples"][-1]
    assert "Sequential / parallel trade-off" in printed and "FLOPs-matched" in printed


def test_flops_matched_multiple():
    """Snell et al. sec. 7: 6 N D + 2 N X t Q = M (6 N D + 2 N t Q) with R = t Q / D."""
    from fastsearch.demos.llm_pretraining import bigger_model, flops_matched_multiple

    for ratio in (0.16, 0.79, 22.0):
        multiple = flops_matched_multiple(ratio, 14)
        assert 6 + 2 * ratio * multiple == pytest.approx(14 * (6 + 2 * ratio))
    assert flops_matched_multiple(1e6, 14) == pytest.approx(14, rel=1e-3)  # heavy load: about M samples
    with pytest.raises(ValueError, match="ratio must be > 0"):
        flops_matched_multiple(0.0)
    problems = reasoning.make_problems(100, seed=6)
    assert _pass_rate(problems, 0.8) + 0.1 < _pass_rate(problems, 0.8, generator=bigger_model())

