"""Part of ``fastsearch demo llm``: the sequential / parallel trade-off of test-time compute (Snell et al. sec. 6).

On the simulated reasoning task (:mod:`fastsearch.models.reasoning` with its revision model
:mod:`fastsearch.models.revision_sim`: a simulation, not an LLM), runs :func:`fastsearch.search.revisions`
at every ratio of sequential to parallel compute (chain length L = 1, 2, 4, ... n; L = 1 is parallel
weighted best-of-N, L = n one chain of revisions) at budgets n = 4, 16, 64, per difficulty level; fits
the compute-optimal ratio per estimated-difficulty bin and budget on a validation set
(:class:`~fastsearch.search.ComputeOptimal` over :func:`~fastsearch.search.revision_strategies`); and
compares it with parallel best-of-N (weighted vote) at budgets up to 256, at equal accuracy. Prints the
tables and writes ``llm_tradeoff.png``.
"""

from __future__ import annotations

import pathlib

import torch

from fastsearch.models import reasoning
from fastsearch.search import ComputeOptimal, best_of_n, revision_strategies, revisions

BUDGETS = (4, 16, 64)
QUICK_BUDGETS = (4, 16)
BON_BUDGETS = (4, 16, 64, 256)
QUICK_BON_BUDGETS = (4, 16, 64)
PROBLEMS = 400
QUICK_PROBLEMS = 60
SELECTION = {"select": "verifier", "across": "weighted"}  # verifier-weighted within and across chains
OPTIONS = {"vote": "weighted", "answer_fn": reasoning.extract_answer}
LEVEL_KEYS = [f"level {level}" for level in range(1, reasoning.LEVELS + 1)]


def _by_level(right: torch.Tensor, levels: torch.Tensor) -> dict[str, float]:
    rows = {"all": float(right.float().mean())}
    rows.update({key: float(right[levels == level].float().mean()) for level, key in enumerate(LEVEL_KEYS, 1)})
    return rows



def simulated_task(count: int):
    """The demos' task: ``count`` validation problems (seed 1) and ``count`` test problems (seed 2), the test
    problems' texts and difficulty levels ([count] int64), and the simulated generator and PRM."""
    validation, test = reasoning.make_problems(count, seed=1), reasoning.make_problems(count, seed=2)
    levels = torch.tensor([p.level for p in test])
    return validation, test, [p.text for p in test], levels, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM()

def run(out_dir: pathlib.Path, *, quick: bool = False, progress: bool = True) -> dict:
    """Measure the trade-off, print its tables and write ``out_dir / "llm_tradeoff.png"``.

    Returns:
        ``{"budgets", "problems" (the test set), "ratios": {L: {"all" | "level k": [accuracy per budget, NaN
        where L > n]}}, "best_ratio": {"level k": [best L per budget]}, "compute_optimal": {"accuracy",
        "tokens", "levels" (per budget, accuracy by level), "policy"}, "best_of_n": {"budgets", "accuracy",
        "tokens"}, "saving": {...}, "flip_rate": float, "plot": path}``.
        ``saving`` holds, for each best-of-N budget, the cheapest compute-optimal budget that reaches its
        accuracy and the ratio of generated tokens (the compute-optimal side counts its difficulty probe).
    """
    budgets = QUICK_BUDGETS if quick else BUDGETS
    bon_budgets = QUICK_BON_BUDGETS if quick else BON_BUDGETS
    count = QUICK_PROBLEMS if quick else PROBLEMS
    validation, test, texts, levels, generator, prm = simulated_task(count)
    lengths = [1 << k for k in range(budgets[-1].bit_length())]
    ratios: dict[int, dict[str, list[float]]] = {}
    for length in lengths:
        rows: dict[str, list[float]] = {}
        for budget in budgets:
            if length > budget:
                values = dict.fromkeys(["all", *LEVEL_KEYS], float("nan"))
            else:
                result = revisions(texts, generator, prm, n=budget, chain_length=length, seed=length, **SELECTION,
                                   answer_fn=reasoning.extract_answer, progress=progress)
                values = _by_level(reasoning.correct(result.answers, test), levels)
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
        ratios[length] = rows
    best_ratio = {key: [_best_length(ratios, key, b) for b in range(len(budgets))] for key in ["all", *LEVEL_KEYS]}
    bon = {"budgets": list(bon_budgets), "accuracy": [], "tokens": []}
    for budget in bon_budgets:
        result = best_of_n(texts, generator, prm, n=budget, seed=budget, **OPTIONS)
        bon["accuracy"].append(float(reasoning.correct(result.answers, test).float().mean()))
        bon["tokens"].append(result.spent.generated_tokens)
    policy = ComputeOptimal(revision_strategies(max_chain_length=budgets[-1], select=SELECTION["select"]),
                            bins=reasoning.LEVELS,
                            options={"answer_fn": reasoning.extract_answer, "across": SELECTION["across"]})
    policy.fit([p.text for p in validation], [p.answer for p in validation], generator, prm, budgets=budgets, seed=0,
               progress=progress)
    optimal = {"accuracy": [], "tokens": [], "levels": [], "policy": policy.policy()}
    for budget in budgets:
        result = policy.search(texts, generator, prm, budget=budget, seed=1, progress=progress)
        optimal["levels"].append(_by_level(reasoning.correct(result.answers, test), levels))
        optimal["accuracy"].append(optimal["levels"][-1]["all"])
        optimal["tokens"].append(result.spent.generated_tokens)
    saving = _saving(bon, optimal, budgets)
    flip_rate = _flip_rate(texts, test, generator)
    plot = _plot(out_dir / "llm_tradeoff.png", ratios, budgets, bon, optimal)
    print(_table(ratios, best_ratio, budgets, count))
    print(f"\nrevisions turned {flip_rate:.0%} of right attempts wrong in the next revision (before selection; "
          "the paper reports about 38%)")
    print("\ncompute-optimal ratio (fitted per estimated-difficulty bin on a validation set) against parallel "
          "best-of-N (weighted vote):")
    print(policy.report())
    print(_comparison(bon, optimal, budgets))
    print(saving["summary"])
    print(f"plot: {plot}")
    return {"budgets": list(budgets), "problems": test, "ratios": ratios, "best_ratio": best_ratio,
            "compute_optimal": optimal, "best_of_n": bon, "saving": saving, "flip_rate": flip_rate, "plot": plot}


def _best_length(ratios: dict[int, dict[str, list[float]]], key: str, budget_index: int) -> int:
    """The chain length with the best accuracy at one budget; ties go to the longer chain (more sequential)."""
    measured = [(values[key][budget_index], length) for length, values in ratios.items()
                if values[key][budget_index] == values[key][budget_index]]
    return max(measured)[1]


def _flip_rate(texts, test, generator) -> float:
    """Share of right attempts whose next revision (one chain of 16 per problem) is wrong."""
    result = revisions(texts, generator, None, n=16, chain_length=16, select="last", seed=0,
                       answer_fn=reasoning.extract_answer)
    right = torch.tensor([answer == test[i // 16].answer for i, answer in enumerate(result.candidate_answers)])
    right = right.view(-1, 16)
    previous, following = right[:, :-1], right[:, 1:]
    return float((previous & ~following).sum() / previous.sum().clamp(min=1))


def _saving(bon: dict, optimal: dict, budgets) -> dict:
    """For each best-of-N budget, the cheapest compute-optimal budget reaching its accuracy, and the token ratio."""
    matches = []
    for bon_budget, target, bon_tokens in zip(bon["budgets"], bon["accuracy"], bon["tokens"], strict=True):
        reached = [i for i, value in enumerate(optimal["accuracy"]) if value >= target]
        if reached:
            first = reached[0]
            matches.append({"best_of_n_budget": bon_budget, "accuracy": target, "budget": budgets[first],
                            "token_ratio": bon_tokens / optimal["tokens"][first]})
    if not matches:
        return {"matches": [], "largest": None,
                "summary": "the compute-optimal ratio did not reach best-of-N's accuracy at any budget"}
    largest = max(matches, key=lambda m: m["token_ratio"])
    summary = (f"compute-optimal ratio at n={largest['budget']} reaches the accuracy of parallel best-of-N at "
               f"n={largest['best_of_n_budget']} ({largest['accuracy']:.3f}) with {largest['token_ratio']:.1f}x "
               "fewer generated tokens (measured; its difficulty probe included)")
    return {"matches": matches, "largest": largest, "summary": summary}


def _table(ratios, best_ratio, budgets, count) -> str:
    lines = [f"Sequential / parallel trade-off, simulated reasoning task with a simulated revision model (a "
             f"simulation, not an LLM), {count} test problems",
             "revisions(n, chain_length=L): n/L parallel chains of L revisions; verifier-weighted vote within and "
             "across chains; accuracy by budget n:",
             f"{'L':>5} {'level':>6}" + "".join(f"{f'n={b}':>8}" for b in budgets)]
    for length, rows in ratios.items():
        for key, values in rows.items():
            label = f"{length}" if key == "all" else ""
            lines.append(f"{label:>5} {key.removeprefix('level '):>6}" + "".join(
                f"{v:8.3f}" if v == v else f"{'-':>8}" for v in values))
    lines.append("best L per level (ties: the longer chain):")
    for key, values in best_ratio.items():
        lines.append(f"{'':>5} {key.removeprefix('level '):>6}" + "".join(
            f"{f'{v}' + ('=n' if v == b else ''):>8}" for v, b in zip(values, budgets, strict=True)))
    return "\n".join(lines)


def _comparison(bon, optimal, budgets) -> str:
    lines = [f"{'n':>6} {'best-of-N acc':>14} {'tokens':>10} {'compute-opt acc':>16} {'tokens':>10}"]
    for index, budget in enumerate(bon["budgets"]):
        row = f"{budget:6d} {bon['accuracy'][index]:14.3f} {bon['tokens'][index] / 1e6:9.2f}M"
        if budget in budgets:
            at = budgets.index(budget)
            row += f" {optimal['accuracy'][at]:16.3f} {optimal['tokens'][at] / 1e6:9.2f}M"
        lines.append(row)
    return "\n".join(lines)


def _plot(path: pathlib.Path, ratios, budgets, bon, optimal) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    for axis, key in zip(axes.flat, LEVEL_KEYS, strict=False):
        for length, rows in ratios.items():
            axis.plot(budgets, rows[key], marker="o", label=f"L={length}" + (" (parallel)" if length == 1 else ""))
        sequential = [ratios[b][key][i] for i, b in enumerate(budgets)]
        axis.plot(budgets, sequential, color="black", linestyle="--", marker="s", label="L=n (sequential)")
        axis.set_title({"level 1": "level 1 (easiest)", f"level {reasoning.LEVELS}":
                        f"level {reasoning.LEVELS} (hardest)"}.get(key, key))
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_xlabel("budget n (attempts per problem)")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    last = axes.flat[-1]
    last.plot(bon["tokens"], bon["accuracy"], marker="o", label="parallel best-of-N (weighted)")
    last.plot(optimal["tokens"], optimal["accuracy"], marker="o", color="black", linewidth=2.5,
              label="compute-optimal ratio")
    last.set_xscale("log")
    last.set_xlabel("generated tokens (all problems)")
    last.set_ylabel("accuracy")
    last.set_title("all problems: compute-optimal ratio vs best-of-N")
    last.grid(alpha=0.3)
    last.legend(fontsize=8)
    figure.suptitle("Simulated reasoning task with a simulated revision model: sequential vs parallel test-time "
                    "compute")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
