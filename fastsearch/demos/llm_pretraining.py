"""Part of ``fastsearch demo llm``: test-time compute against pretraining compute, FLOPs-matched (Snell et al. sec. 7).

On the simulated reasoning task (a simulation, not an LLM). A model with N parameters pretrained on D
tokens costs 6 N D FLOPs to train and 2 N T to generate T tokens. With R = D_inference / D_pretraining
(the inference load the bigger model serves, in tokens, over its pretraining tokens), a model with M times
the parameters, answering each query with one sample of t_big tokens, costs ``M N D (6 + 2 R)`` in all; the
small model matches that total when each query may use ``X = (M (6 + 2 R) - 6) / (2 R)`` times t_big tokens
of test-time compute. So test-time compute is plentiful when the inference load is small (R << 1) and
shrinks to about M samples when it is large (R >> 1).

The bigger model is modelled as :class:`~fastsearch.models.reasoning.SimulatedGenerator` with every
per-step error rate multiplied by ``M ** -ERROR_EXPONENT`` (an assumption of this simulation: error falling
as a small power of the parameter count); its accuracy is its expected single-sample accuracy at the same
temperature. The small model spends its allowance on the compute-optimal revisions policy of
:mod:`fastsearch.demos.llm_tradeoff` at the largest fitted budget whose measured tokens per query (its
difficulty probe included) fit in ``X * t_big``. Per difficulty level and R, the table and
``llm_pretraining.png`` say which side answers more problems.
"""

from __future__ import annotations

import pathlib

import torch

from fastsearch.models import reasoning

PARAMETER_RATIO = 14  # M: the bigger model has 14 times the parameters (the paper's comparison)
ERROR_EXPONENT = 0.25  # the bigger model's per-step error rates: the small model's times M ** -0.25
RATIOS = (0.16, 0.79, 22.0)  # R = inference tokens / pretraining tokens, the paper's three settings
SAMPLES = 16  # samples per problem to estimate the bigger model's single-sample accuracy
LEVEL_KEYS = [f"level {level}" for level in range(1, reasoning.LEVELS + 1)]


def flops_matched_multiple(ratio: float, parameter_ratio: float = PARAMETER_RATIO) -> float:
    """X: the small model's tokens per query, in units of the bigger model's one sample, at equal total FLOPs.

    ``6 N D + 2 N X t D_q = 6 M N D + 2 M N t D_q`` with ``R = t D_q / D`` gives ``X = (M (6 + 2 R) - 6) / (2 R)``.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    return (parameter_ratio * (6 + 2 * ratio) - 6) / (2 * ratio)


def bigger_model(parameter_ratio: float = PARAMETER_RATIO) -> reasoning.SimulatedGenerator:
    """The simulated model with ``parameter_ratio`` times the parameters: lower per-step error rates."""
    small = reasoning.SimulatedGenerator()
    factor = parameter_ratio ** -ERROR_EXPONENT
    return reasoning.SimulatedGenerator(step_error_min=small.step_error_min * factor,
                                        step_error_range=small.step_error_range * factor)


def run(out_dir: pathlib.Path, tradeoff: dict, *, quick: bool = False) -> dict:
    """Compare, print the table and write ``out_dir / "llm_pretraining.png"``.

    Args:
        out_dir: where the plot goes.
        tradeoff: what :func:`fastsearch.demos.llm_tradeoff.run` returned (its test problems, budgets and
            the compute-optimal policy's accuracy by level and tokens per budget).
        quick: fewer samples of the bigger model.

    Returns:
        ``{"ratios": [R], "multiples": [X], "budgets": [small model's budget per R or None], "big": {"all" |
        "level k": accuracy}, "small": [{"all" | "level k": accuracy} per R], "winner": [{"level k":
        "test-time" | "bigger model" | "tie"} per R], "plot": path}``.
    """
    problems = tradeoff["problems"]
    levels = torch.tensor([p.level for p in problems])
    samples = 4 if quick else SAMPLES
    outputs = bigger_model().generate([p.text + "\n\n" for p in problems], n=samples, stop=None, seed=0)
    right = torch.tensor([[reasoning.extract_answer(c.text) == p.answer for c in row]
                          for p, row in zip(problems, outputs, strict=True)]).float().mean(-1)
    big_tokens = sum(c.num_tokens for row in outputs for c in row) / (len(problems) * samples)
    big = {"all": float(right.mean())}
    big.update({key: float(right[levels == level].mean()) for level, key in enumerate(LEVEL_KEYS, 1)})
    optimal, budgets = tradeoff["compute_optimal"], tradeoff["budgets"]
    per_query = [tokens / len(problems) for tokens in optimal["tokens"]]
    multiples, chosen, small, winner = [], [], [], []
    for ratio in RATIOS:
        multiple = flops_matched_multiple(ratio)
        fits = [i for i, tokens in enumerate(per_query) if tokens <= multiple * big_tokens]
        multiples.append(multiple)
        chosen.append(budgets[fits[-1]] if fits else None)
        rows = optimal["levels"][fits[-1]] if fits else dict.fromkeys(["all", *LEVEL_KEYS], float("nan"))
        small.append(rows)
        winner.append({key: _winner(rows[key], big[key]) for key in ["all", *LEVEL_KEYS]})
    plot = _plot(out_dir / "llm_pretraining.png", small, big, multiples, chosen)
    print(_table(small, big, multiples, chosen, big_tokens, len(problems)))
    print(f"plot: {plot}")
    return {"ratios": list(RATIOS), "multiples": multiples, "budgets": chosen, "big": big, "small": small,
            "winner": winner, "plot": plot}


def _winner(small: float, big: float) -> str:
    if small != small:
        return "bigger model"  # no test-time budget fits: the small model cannot match the FLOPs usefully
    if abs(small - big) < 0.005:
        return "tie"
    return "test-time" if small > big else "bigger model"


def _table(small, big, multiples, chosen, big_tokens, count) -> str:
    lines = [f"Test-time compute vs a {PARAMETER_RATIO}x bigger model, FLOPs-matched (simulated task, a simulation, "
             f"not an LLM), {count} problems",
             f"bigger model: per-step errors x {PARAMETER_RATIO}^-{ERROR_EXPONENT}, one sample per query "
             f"({big_tokens:.0f} tokens); small model: compute-optimal revisions within X x those tokens",
             f"{'R':>6} {'X':>7} {'small n':>8}  " + "  ".join(f"{k.removeprefix('level '):>17}"
                                                           for k in ["all", *LEVEL_KEYS]),
             f"{'':>6} {'':>7} {'':>8}  " + "  ".join(f"{'small/big winner':>17}" for _ in range(6))]
    for ratio_index, (multiple, budget) in enumerate(zip(multiples, chosen, strict=True)):
        cells = []
        for key in ["all", *LEVEL_KEYS]:
            value = small[ratio_index][key]
            mark = {"test-time": "TT", "bigger model": "BIG", "tie": "="}[_winner(value, big[key])]
            cells.append(f"{value:.2f}/{big[key]:.2f} {mark:>3}".rjust(17) if value == value
                         else f"-/{big[key]:.2f} BIG".rjust(17))
        lines.append(f"{RATIOS[ratio_index]:6.2f} {multiple:7.1f} {str(budget):>8}  " + "  ".join(cells))
    lines.append("TT: test-time compute on the small model answers more; BIG: the bigger model does")
    return "\n".join(lines)


def _plot(path: pathlib.Path, small, big, multiples, chosen) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(RATIOS), figsize=(4.5 * len(RATIOS), 4), sharey=True)
    positions = torch.arange(len(LEVEL_KEYS)).float()
    for axis, rows, ratio, multiple, budget in zip(axes, small, RATIOS, multiples, chosen, strict=True):
        axis.bar(positions - 0.2, [rows[k] for k in LEVEL_KEYS], width=0.4,
                 label=f"small model + test-time (n={budget})")
        axis.bar(positions + 0.2, [big[k] for k in LEVEL_KEYS], width=0.4, label=f"{PARAMETER_RATIO}x bigger model")
        axis.set_xticks(positions.tolist(), [k.removeprefix("level ") for k in LEVEL_KEYS])
        axis.set_xlabel("difficulty level (1 easiest)")
        axis.set_title(f"R = {ratio:g} (X = {multiple:.0f})")
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("accuracy")
    figure.suptitle("FLOPs-matched: test-time compute on a small model vs pretraining a bigger one (a simulation)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
