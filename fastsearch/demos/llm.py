"""``fastsearch demo llm``: accuracy against budget per strategy and difficulty on the simulated reasoning task.

Runs best-of-N, beam search (beam width 4 and sqrt(n)) and DVTS at n = 4 ... 256 on a test set of
:mod:`fastsearch.models.reasoning` problems (a simulation, not an LLM), fits the compute-optimal policy on
a separate validation set, prints accuracy per strategy and difficulty level, and plots it
(``llm_scaling.png``). It reproduces the shape of Snell et al. (2024): beam search ahead at small budgets
and on hard problems, best-of-N catching up at large budgets on easy ones, and the compute-optimal policy
reaching best-of-N's accuracy with several times fewer generated tokens.

Then it runs the two other comparisons of the paper on the same simulated task (with its simulated revision
model): sequential against parallel compute (:mod:`fastsearch.demos.llm_tradeoff`, ``llm_tradeoff.png``)
and test-time against pretraining compute (:mod:`fastsearch.demos.llm_pretraining`,
``llm_pretraining.png``).
"""

from __future__ import annotations

import pathlib
import time

import torch

from fastsearch.demos import llm_pretraining, llm_tradeoff
from fastsearch.models import reasoning
from fastsearch.search import ComputeOptimal, default_strategies

BUDGETS = (4, 16, 64, 256)
QUICK_BUDGETS = (4, 16)
PROBLEMS = 160
QUICK_PROBLEMS = 24
COMPUTE_OPTIMAL = "compute_optimal"


def _accuracy_rows(right: torch.Tensor, levels: torch.Tensor) -> dict[str, float]:
    """Accuracy overall and per level from a [G] bool tensor."""
    rows = {"all": float(right.float().mean())}
    for level in range(1, reasoning.LEVELS + 1):
        rows[f"level {level}"] = float(right[levels == level].float().mean())
    return rows


def run(out_dir: pathlib.Path, *, quick: bool = False, progress: bool = True) -> dict:
    """Run the comparison, print the table and write ``out_dir / "llm_scaling.png"``.

    Args:
        out_dir: where the plot goes (created if missing).
        quick: a few problems and budgets 4 and 16 (seconds, for tests).
        progress: progress bars.

    Returns:
        ``{"budgets", "accuracy": {strategy: {"all" | "level k": [per budget]}}, "tokens": {strategy: [per
        budget]}, "policy": {budget: [strategy per difficulty bin]}, "matches": {...}, "plot": path, "tradeoff":
        {...}, "pretraining": {...}, "seconds"}`` where ``matches`` says at which budget the compute-optimal
        policy first reaches best-of-N's accuracy at the largest budget, and the ratio of generated tokens;
        ``tradeoff`` and ``pretraining`` are what :func:`fastsearch.demos.llm_tradeoff.run` and
        :func:`fastsearch.demos.llm_pretraining.run` return.
    """
    began = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = QUICK_BUDGETS if quick else BUDGETS
    count = QUICK_PROBLEMS if quick else PROBLEMS
    validation, test, texts, levels, generator, prm = llm_tradeoff.simulated_task(count)
    options = {"vote": "weighted", "answer_fn": reasoning.extract_answer}
    strategies = default_strategies(max_steps=reasoning.MAX_STEPS + 2)
    policy = ComputeOptimal(strategies, bins=reasoning.LEVELS, options=options)
    policy.fit([p.text for p in validation], [p.answer for p in validation], generator, prm, budgets=budgets, seed=0,
               progress=progress)
    accuracy: dict[str, dict[str, list[float]]] = {}
    tokens: dict[str, list[int]] = {}
    for index, strategy in enumerate(strategies):
        for budget in budgets:
            result = strategy.search(texts, generator, prm, seed=index, progress=progress, **strategy.settings(budget),
                                     **options)
            rows = _accuracy_rows(reasoning.correct(result.answers, test), levels)
            for key, value in rows.items():
                accuracy.setdefault(strategy.name, {}).setdefault(key, []).append(value)
            tokens.setdefault(strategy.name, []).append(result.spent.generated_tokens)
    for budget in budgets:
        result = policy.search(texts, generator, prm, budget=budget, seed=len(strategies), progress=progress)
        for key, value in _accuracy_rows(reasoning.correct(result.answers, test), levels).items():
            accuracy.setdefault(COMPUTE_OPTIMAL, {}).setdefault(key, []).append(value)
        tokens.setdefault(COMPUTE_OPTIMAL, []).append(result.spent.generated_tokens)
    matches = _matches(accuracy, tokens, budgets)
    plot = _plot(out_dir / "llm_scaling.png", accuracy, budgets)
    print(_table(accuracy, tokens, budgets, count))
    print("\ncompute-optimal policy (validation accuracy of the chosen strategy; bins by estimated difficulty):")
    print(policy.report())
    print(f"\n{matches['summary']}")
    print(f"plot: {plot}  ({time.perf_counter() - began:.0f} s)\n")
    tradeoff = llm_tradeoff.run(out_dir, quick=quick, progress=progress)
    print()
    pretraining = llm_pretraining.run(out_dir, tradeoff, quick=quick)
    seconds = time.perf_counter() - began
    print(f"({seconds:.0f} s)")
    return {"budgets": list(budgets), "accuracy": accuracy, "tokens": tokens, "policy": policy.policy(),
            "matches": matches, "plot": plot, "tradeoff": tradeoff, "pretraining": pretraining, "seconds": seconds}


def _matches(accuracy, tokens, budgets) -> dict:
    """The smallest budget at which the compute-optimal policy reaches best-of-N's accuracy at the largest one."""
    target = accuracy["best_of_n"]["all"][-1]
    reached = [i for i, value in enumerate(accuracy[COMPUTE_OPTIMAL]["all"]) if value >= target]
    if not reached:
        return {"budget": None, "token_ratio": None,
                "summary": f"compute-optimal did not reach best-of-N's accuracy at n={budgets[-1]} ({target:.2f})"}
    first = reached[0]
    ratio = tokens["best_of_n"][-1] / tokens[COMPUTE_OPTIMAL][first]
    summary = (f"compute-optimal at n={budgets[first]} ({accuracy[COMPUTE_OPTIMAL]['all'][first]:.2f}, "
               f"{tokens[COMPUTE_OPTIMAL][first]:,} tokens with its difficulty probe) matches best-of-N at "
               f"n={budgets[-1]} ({target:.2f}, {tokens['best_of_n'][-1]:,} tokens): {ratio:.1f}x less compute")
    return {"budget": budgets[first], "token_ratio": ratio, "summary": summary}


def _table(accuracy, tokens, budgets, count) -> str:
    width = max(len(name) for name in accuracy) + 2
    lines = [f"Simulated reasoning task (fastsearch.models.reasoning: a simulation, not an LLM), {count} test "
             f"problems; weighted vote over the final candidates",
             "accuracy by generation budget n, overall and per difficulty level (1 easiest):",
             f"{'strategy':{width}}{'level':8}" + "".join(f"{f'n={b}':>8}" for b in budgets)]
    for name, rows in accuracy.items():
        for key, values in rows.items():
            label = name if key == "all" else ""
            lines.append(f"{label:{width}}{key.removeprefix('level '):8}" + "".join(f"{v:8.2f}" for v in values))
        lines.append(f"{'':{width}}{'tokens':8}" + "".join(f"{t / 1e6:7.2f}M" for t in tokens[name]))
    return "\n".join(lines)


def _plot(path: pathlib.Path, accuracy, budgets) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["all"] + [f"level {level}" for level in range(1, reasoning.LEVELS + 1)]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True, sharey=True)
    for axis, panel in zip(axes.flat, panels, strict=True):
        for name, rows in accuracy.items():
            style = {"color": "black", "linewidth": 2.5} if name == COMPUTE_OPTIMAL else {}
            axis.plot(budgets, rows[panel], marker="o", label=name, **style)
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_title({"all": "all problems", "level 1": "level 1 (easiest)",
                        f"level {reasoning.LEVELS}": f"level {reasoning.LEVELS} (hardest)"}.get(panel, panel))
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("generation budget n")
    for axis in axes[:, 0]:
        axis.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("Simulated reasoning task (a simulation): test-time search strategies against budget")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
