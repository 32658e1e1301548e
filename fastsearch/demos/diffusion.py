"""The diffusion demo: how each noise search scales with compute, on the two embedded models.

For the Gaussian-mixture flow model (:mod:`fastsearch.models.gmm`, a 2-D mixture with a rare mode; the verifier
is the rare mode's log-density) and the digits flow model (:mod:`fastsearch.models.digits` at weak guidance;
the verifier is the classifier's log-probability of the requested digit), every search runs at several NFE
budgets per prompt:

- no search: one sample per prompt with ``budget`` sampler steps (the scaling-the-denoising-steps baseline);
- random search, zero-order search, search over paths (Ma et al. 2025) and FK steering (Singhal et al. 2025),
  each with a fixed sampler of ``steps`` steps and ``budget_nfe=budget``.

The score at a budget is the verifier score of each prompt's best sample, averaged over prompts; the NFE of a
point is what the search reports it spent (at most the budget). ``run`` prints the tables, writes
``diffusion_scaling.png`` (score against NFEs, one panel per model) and ``digits_best.png`` (the best digit per
requested label, per algorithm, at the largest budget), and returns the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastsearch.diffusion import (
    FlowSampler,
    NoiseSearchResult,
    fk_steering,
    no_search,
    paths_search,
    random_search,
    zero_order_search,
)

ALGORITHMS = ("no search", "random", "zero-order", "paths", "FK")
NUM_NEIGHBORS = 3
BRANCHES = 2


@dataclass
class _Model:
    """One embedded model as the demo runs it: denoiser, verifier, conditioning and budgets."""

    name: str
    title: str
    model: Callable
    verifier: Callable
    shape: tuple[int, ...]
    cond: dict
    steps: int
    budgets: list[int]
    fk_lam: float  # FK's lambda, in the verifier's units: tens of nats for the GMM, a few for the digits
    # further per-result numbers (name -> function of the result), reported like the score
    metrics: dict[str, Callable[[NoiseSearchResult], float]] = field(default_factory=dict)


def min_budget(algorithm: str, steps: int) -> int:
    """The smallest budget each search is run at.

    Zero-order search needs ``NUM_NEIGHBORS + 1`` samples a round; with the intervals of ``_search`` one path
    costs less than 4 samples (paths_search raises if it did not fit, so this cannot silently drift).
    """
    return {"no search": 1, "random": steps, "FK": steps, "zero-order": (NUM_NEIGHBORS + 1) * steps,
            "paths": 4 * steps}[algorithm]


def _search(algorithm: str, setup: _Model, budget: int, seed: int) -> NoiseSearchResult:
    steps = setup.steps
    common = {"seed": seed, "progress": False, **setup.cond}
    args = (setup.model, setup.verifier)
    if algorithm == "no search":
        return no_search(*args, FlowSampler(budget), setup.shape, **common)
    sampler = FlowSampler(steps)
    if algorithm == "random":
        return random_search(*args, sampler, setup.shape, budget_nfe=budget, **common)
    if algorithm == "zero-order":
        return zero_order_search(*args, sampler, setup.shape, num_neighbors=NUM_NEIGHBORS, budget_nfe=budget, **common)
    if algorithm == "paths":
        # branch from the middle of the schedule, re-noise a fifth of it and denoise twice that per round
        forward = max(1, steps // 5)
        return paths_search(*args, sampler, setup.shape, branches=BRANCHES, start_level=steps // 2,
                            forward_interval=forward, backward_interval=2 * forward, budget_nfe=budget, **common)
    return fk_steering(*args, FlowSampler(steps, stochastic=True), setup.shape, potential="max", lam=setup.fk_lam,
                       resample_every=2, budget_nfe=budget, **common)


def _gmm_setup(quick: bool) -> _Model:
    from fastsearch.models.gmm import ModeLogDensity, rare_mode_mixture

    mixture = rare_mode_mixture(dim=2)
    steps = 4 if quick else 10
    return _Model(name="gmm", title="Gaussian mixture (2-D): rare mode log-density", model=mixture.flow_model(),
                  verifier=ModeLogDensity(mixture), shape=(2,), cond={"num_prompts": 16 if quick else 128},
                  steps=steps, budgets=[steps * 2**k for k in range(3 if quick else 6)], fk_lam=1.0)


def _digits_setup(quick: bool, progress: bool) -> tuple[_Model, float]:
    from fastsearch.models import digits

    begin = time.perf_counter()
    trained = digits.load_digits_models(digits.QUICK_CONFIG if quick else digits.DigitsConfig(), progress=progress)
    load_seconds = time.perf_counter() - begin
    labels = torch.arange(digits.NUM_CLASSES).repeat(2 if quick else 4)

    def accuracy(result: NoiseSearchResult) -> float:
        return (trained.predict(result.sample) == labels).float().mean().item()

    steps = 4 if quick else 10
    setup = _Model(name="digits", title=f"digits (guidance {digits.WEAK_GUIDANCE}): log p(label | x0)",
                   model=trained.model(guidance=digits.WEAK_GUIDANCE), verifier=trained.verifier(),
                   shape=digits.IMAGE_SHAPE, cond={"label": labels}, steps=steps,
                   budgets=[steps * 2**k for k in range(3 if quick else 5)], fk_lam=2.0, metrics={"accuracy": accuracy})
    return setup, load_seconds


def _run_model(setup: _Model, bar: tqdm) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every search at every budget it fits. Returns the numbers and the best samples at the largest budget."""
    names = ("score", "nfe", *setup.metrics)
    numbers = {"budgets": setup.budgets, "steps": setup.steps, **{name: {} for name in names}}
    best_samples = {}
    begin = time.perf_counter()
    for algorithm in ALGORITHMS:
        rows = {name: [] for name in names}
        for budget in setup.budgets:
            if budget < min_budget(algorithm, setup.steps):
                for values in rows.values():
                    values.append(None)
                continue
            result = _search(algorithm, setup, budget, seed=budget)
            rows["score"].append(result.score.mean().item())
            rows["nfe"].append(result.nfe)
            for name, metric in setup.metrics.items():
                rows[name].append(metric(result))
            best_samples[algorithm] = result.sample
            bar.update()
        for name in names:
            numbers[name][algorithm] = rows[name]
    numbers["seconds"] = time.perf_counter() - begin
    return numbers, best_samples


def _table(title: str, budgets: list[int], rows: dict[str, list], digits: int) -> str:
    width = max(8, max(len(str(b)) for b in budgets) + 2)
    lines = [title, f"{'NFE budget':<12}" + "".join(f"{b:>{width}}" for b in budgets)]
    for algorithm, values in rows.items():
        cells = "".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}" for v in values)
        lines.append(f"{algorithm:<12}{cells}")
    return "\n".join(lines)


def _plot_scaling(path: Path, results: dict, setups: list[_Model]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(setups), figsize=(6 * len(setups), 4.2))
    for axis, setup in zip(axes, setups, strict=True):
        numbers = results[setup.name]
        for algorithm in ALGORITHMS:
            points = [(n, s) for n, s in zip(numbers["nfe"][algorithm], numbers["score"][algorithm], strict=True)
                      if s is not None]
            axis.plot(*zip(*points, strict=True), marker="o", label=algorithm)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFEs per prompt")
        axis.set_ylabel("mean best verifier score")
        axis.set_title(setup.title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_digits(path: Path, best_samples: dict[str, torch.Tensor], budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastsearch.models.digits import NUM_CLASSES

    figure, axes = plt.subplots(len(best_samples), NUM_CLASSES, figsize=(NUM_CLASSES, len(best_samples) + 0.6),
                                squeeze=False)
    for row, (algorithm, samples) in enumerate(best_samples.items()):
        for label in range(NUM_CLASSES):
            axis = axes[row, label]
            axis.imshow(samples[label, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(str(label))
            if label == 0:
                axis.set_ylabel(algorithm, fontsize=8)
    figure.suptitle(f"best digit per requested label, {budget} NFEs per prompt")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(out_dir: Path, *, quick: bool = False, progress: bool = True) -> dict:
    """Run every search on both embedded models at several budgets; print, plot and return the results.

    Args:
        out_dir: folder for ``diffusion_scaling.png`` and ``digits_best.png`` (created if missing).
        quick: a seconds-long version (fewer steps, budgets and prompts; the digits model of
            :data:`fastsearch.models.digits.QUICK_CONFIG`).
        progress: show tqdm bars while training the digits model and over the searches.

    Runs on one CPU thread (restored afterwards); the full version takes about a minute on a 2-core CPU,
    training the digits model included, and a few seconds once it is cached.

    Returns:
        ``{"gmm": numbers, "digits": numbers, "seconds": {"digits_load", "gmm", "digits", "total"},
        "files": {"scaling", "digits"}}`` where ``numbers`` is ``{"budgets": [...], "steps": int,
        "score": {algorithm: [mean best score or None per budget]}, "nfe": {algorithm: [NFEs per prompt or
        None]}, "seconds": float}`` and the digits numbers also hold ``"accuracy"`` (fraction of prompts whose
        best sample the classifier reads as the requested digit), keyed like ``"score"``.
    """
    from fastsearch.models.digits import one_thread

    begin = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    # The demo's tensors are small: one thread beats two, and by far on a machine shared with other work.
    with one_thread():
        digits_setup, load_seconds = _digits_setup(quick, progress)
        setups = [_gmm_setup(quick), digits_setup]
        total = sum(1 for setup in setups for algorithm in ALGORITHMS for budget in setup.budgets
                    if budget >= min_budget(algorithm, setup.steps))
        with tqdm(total=total, desc="diffusion demo", unit="search", disable=not progress) as bar:
            for setup in setups:
                results[setup.name], best = _run_model(setup, bar)
    digits_best = best
    for setup in setups:
        numbers = results[setup.name]
        print(_table(f"\n{setup.title}, {setup.steps}-step sampler (mean over prompts of the best score)",
                     setup.budgets, numbers["score"], 3))
        if "accuracy" in numbers:
            print(_table("\ndigits: fraction of prompts whose best sample shows the requested digit", setup.budgets,
                         numbers["accuracy"], 2))
    scaling_path, digits_path = out_dir / "diffusion_scaling.png", out_dir / "digits_best.png"
    _plot_scaling(scaling_path, results, setups)
    _plot_digits(digits_path, digits_best, digits_setup.budgets[-1])
    seconds = {"digits_load": load_seconds, "gmm": results["gmm"]["seconds"], "digits": results["digits"]["seconds"],
               "total": time.perf_counter() - begin}
    print(f"\nwrote {scaling_path} and {digits_path} in {seconds['total']:.1f} s "
          f"(digits model load/train {load_seconds:.1f} s)")
    return {**results, "seconds": seconds, "files": {"scaling": scaling_path, "digits": digits_path}}
