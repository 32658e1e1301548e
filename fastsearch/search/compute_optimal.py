"""The compute-optimal test-time search policy of Snell et al. (2024).

Fit on a validation set: for every difficulty bin and generation budget, the strategy (with its
hyperparameters) that answers most problems correctly. The strategies can be PRM searches
(:func:`default_strategies`), sequential revisions at every ratio of sequential to parallel compute
(:func:`revision_strategies`: chain length 1, 2, 4, ... n), or both together. A new problem's difficulty
is estimated from a few cheap samples scored by the verifier (a problem whose samples the verifier rates
low is hard), and the problem is searched with the strategy its bin and the budget call for. The
difficulty estimate costs compute, and that is counted in what the search reports it spent.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from fastsearch.checks import check_choice, check_int, check_texts
from fastsearch.search.algorithms import beam_search, best_of_n, dvts
from fastsearch.search.revisions import SELECT, revisions
from fastsearch.search.types import Generator, SearchResult, Spent, StepVerifier
from fastsearch.seeding import Stream, check_seed, derive_seed, resolve_seed


@dataclass(frozen=True)
class Strategy:
    """A search strategy and how its settings follow the budget.

    Attributes:
        name: how reports call it, e.g. ``"beam_search(M=4)"``.
        search: the search function (:func:`best_of_n`, :func:`beam_search`, ...).
        settings: budget -> the keyword arguments for ``search`` (``n``, ``beam_width``, ...), or None
            where the strategy does not apply at that budget.
    """

    name: str
    search: Callable[..., SearchResult]
    settings: Callable[[int], dict | None]


def _sqrt_width(budget: int) -> int:
    """The largest divisor of the budget that is at most its square root (Snell et al.'s M = sqrt(N))."""
    return max(width for width in range(1, math.isqrt(budget) + 1) if budget % width == 0)


def default_strategies(*, max_steps: int = 40) -> list[Strategy]:
    """Best-of-N, beam search with beam width 4 and sqrt(N) (Snell et al.'s), and DVTS with width 4.

    Args:
        max_steps: step limit of the step-level searches.
    """
    def width_four(budget: int) -> dict | None:
        return {"n": budget, "beam_width": 4, "max_steps": max_steps} if budget % 4 == 0 else None

    return [
        Strategy("best_of_n", best_of_n, lambda budget: {"n": budget}),
        Strategy("beam_search(M=4)", beam_search, width_four),
        Strategy("beam_search(M=sqrt n)", beam_search,
                 lambda budget: {"n": budget, "beam_width": _sqrt_width(budget), "max_steps": max_steps}),
        Strategy("dvts(M=4)", dvts, width_four),
    ]


def revision_strategies(*, max_chain_length: int = 256, select: str = "verifier", history: int = 4) -> list[Strategy]:
    """Sequential revisions at every power-of-two chain length: ``revisions(L=1)`` (all parallel: n chains
    of one attempt), ``revisions(L=2)``, ... up to ``max_chain_length``; at budget n a chain length applies
    when it divides n (``L=n``: one chain, all sequential).

    Args:
        max_chain_length: the longest chain.
        select: within-chain selection of :func:`~fastsearch.search.revisions`.
        history: earlier attempts each revision sees.

    Example:
        >>> policy = ComputeOptimal(default_strategies() + revision_strategies())   # PRM search and revisions
    """
    max_chain_length = check_int("max_chain_length", max_chain_length)
    check_choice("select", select, SELECT)
    history = check_int("history", history, minimum=0)

    def chains_of(length: int) -> Callable[[int], dict | None]:
        def settings(budget: int) -> dict | None:
            if budget % length:
                return None
            return {"n": budget, "chain_length": length, "select": select, "history": history}
        return settings

    lengths = [1 << k for k in range(max_chain_length.bit_length()) if 1 << k <= max_chain_length]
    return [Strategy(f"revisions(L={length})", revisions, chains_of(length)) for length in lengths]


def _accepted(search: Callable, options: dict) -> dict:
    """The options ``search`` takes (``vote`` goes to best-of-N, not to revisions, ...)."""
    parameters = inspect.signature(search).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {key: value for key, value in options.items() if key in parameters}


class ComputeOptimal:
    """Pick the search strategy per problem from its estimated difficulty and the budget.

    Args:
        strategies: the candidates (default :func:`default_strategies`); ties go to the earlier one.
        bins: difficulty bins (equal-count quantiles of the validation set's estimated difficulty).
        probe_n: samples per problem for the difficulty estimate (best-of-N samples; difficulty = 1 - their
            mean verifier score).
        options: keyword arguments for every search that takes them (``aggregate``, ``vote``, ``answer_fn``,
            ``temperature``, ``max_tokens``, ``step_delimiter``, ``prompt_fn``, ``revision_prompt``, ...):
            each search gets those its signature names.

    Example:
        >>> policy = ComputeOptimal(options={"vote": "weighted"}).fit(val_problems, val_answers, gen, prm)
        >>> result = policy.search(problems, gen, prm, budget=16)
        >>> result.info["strategy"]   # the strategy each problem got
    """

    def __init__(self, strategies: Sequence[Strategy] | None = None, *, bins: int = 5, probe_n: int = 4,
                 options: dict | None = None):
        self.strategies = list(default_strategies() if strategies is None else strategies)
        if not self.strategies or not all(isinstance(s, Strategy) for s in self.strategies):
            raise TypeError("strategies must be a non-empty list of Strategy")
        self.bins = check_int("bins", bins)
        self.probe_n = check_int("probe_n", probe_n)
        self.options = dict(options or {})
        for reserved in ("n", "beam_width", "chain_length", "seed", "progress"):
            if reserved in self.options:
                raise ValueError(f"options must not set {reserved!r}: the policy chooses it")
        self.edges: torch.Tensor | None = None
        self.budgets: list[int] = []
        self.accuracy: torch.Tensor | None = None
        self.choice: torch.Tensor | None = None

    def difficulty(self, problems: Sequence[str], generator: Generator, verifier: StepVerifier, *,
                   seed: int | None = None) -> tuple[torch.Tensor, Spent]:
        """Estimated difficulty [G] float32 in [0, 1] (1 - mean verifier score of ``probe_n`` samples) and
        what the estimate spent."""
        probe = best_of_n(problems, generator, verifier, n=self.probe_n, seed=seed, **self._probe_options())
        return 1.0 - probe.scores.view(-1, self.probe_n).nan_to_num(0.0).mean(-1), probe.spent

    def fit(self, problems: Sequence[str], answers: Sequence[str], generator: Generator, verifier: StepVerifier, *,
            budgets: Sequence[int] = (4, 16, 64, 256), seed: int = 0,
            is_correct: Callable[[str, str], bool] | None = None, progress: bool = False) -> ComputeOptimal:
        """Run every strategy at every budget on a validation set and keep, per difficulty bin and budget,
        the most accurate one.

        Args:
            problems: G validation problems.
            answers: their G correct answers.
            generator, verifier: as for the searches.
            budgets: generation budgets (n) to fit.
            seed: seed of the validation runs.
            is_correct: ``(answer, reference) -> bool``; default string equality.
            progress: a progress bar over the runs.

        Returns:
            self.
        """
        problems = check_texts("problems", problems)
        if len(answers) != len(problems):
            raise ValueError(f"got {len(answers)} answers for {len(problems)} problems")
        budgets = [check_int(f"budgets[{index}]", budget) for index, budget in enumerate(budgets)]
        if not budgets:
            raise ValueError("budgets is empty")
        seed = check_seed(seed)
        same = is_correct or str.__eq__
        difficulty, _ = self.difficulty(problems, generator, verifier, seed=derive_seed(seed, Stream.PROBE))
        levels = torch.arange(1, self.bins, dtype=torch.float32) / self.bins
        self.edges = torch.quantile(difficulty, levels)
        bin_of = torch.bucketize(difficulty, self.edges)
        per_bin = torch.bincount(bin_of, minlength=self.bins).clamp(min=1).float()
        accuracy = torch.full((len(budgets), self.bins, len(self.strategies)), -1.0)
        runs = [(b, s) for b in range(len(budgets)) for s in range(len(self.strategies))]
        for b, s in tqdm(runs, desc="ComputeOptimal.fit", disable=not progress, leave=False):
            strategy = self.strategies[s]
            settings = strategy.settings(budgets[b])
            if settings is None:
                continue
            result = strategy.search(problems, generator, verifier, seed=derive_seed(seed, Stream.FIT, b, s),
                                     **settings, **_accepted(strategy.search, self.options))
            right = torch.tensor(list(map(same, result.answers, answers)), dtype=torch.float32)
            accuracy[b, :, s] = torch.zeros(self.bins).index_add_(0, bin_of, right) / per_bin
        self.budgets, self.accuracy = budgets, accuracy
        # argmax takes the first maximum: ties go to the earlier strategy.
        self.choice = accuracy.argmax(-1)
        return self

    def policy(self) -> dict[int, list[str]]:
        """Per fitted budget, the strategy name chosen for each difficulty bin (easiest first)."""
        self._check_fitted()
        return {budget: [self.strategies[s].name for s in self.choice[b].tolist()]
                for b, budget in enumerate(self.budgets)}

    def search(self, problems: Sequence[str], generator: Generator, verifier: StepVerifier, *, budget: int,
               seed: int | None = None, progress: bool = False) -> SearchResult:
        """Estimate every problem's difficulty, then search each with its bin's strategy at ``budget``.

        Problems that get the same strategy are searched together in one batch.

        Returns:
            :class:`SearchResult` in problem order; ``spent`` includes the difficulty estimate;
            ``info`` holds ``"strategy"`` (the name per problem), ``"difficulty"`` [G] and ``"bin"`` [G].
        """
        self._check_fitted()
        began = time.perf_counter()
        problems = check_texts("problems", problems)
        if budget not in self.budgets:
            raise ValueError(f"budget must be one of the fitted budgets {self.budgets}, got {budget!r}")
        seed = resolve_seed(seed)
        difficulty, spent = self.difficulty(problems, generator, verifier, seed=derive_seed(seed, Stream.PROBE))
        bin_of = torch.bucketize(difficulty, self.edges)
        choice = self.choice[self.budgets.index(budget)][bin_of]
        parts = []
        for s in torch.unique(choice).tolist():
            members = torch.nonzero(choice == s).flatten()
            strategy = self.strategies[s]
            result = strategy.search([problems[i] for i in members.tolist()], generator, verifier,
                                     seed=derive_seed(seed, Stream.SEARCH, s), progress=progress,
                                     **strategy.settings(budget),
                                     **_accepted(strategy.search, self.options))
            parts.append((members, result))
        merged = _merge(parts, len(problems), spent)
        merged.spent.wall_seconds = time.perf_counter() - began
        merged.spent.overhead_seconds = max(merged.spent.wall_seconds - merged.spent.generator_seconds
                                            - merged.spent.verifier_seconds, 0.0)
        merged.strategy = f"compute_optimal(budget={budget})"
        merged.info = {"strategy": [self.strategies[s].name for s in choice.tolist()], "difficulty": difficulty,
                       "bin": bin_of}
        return merged

    def report(self) -> str:
        """The fitted policy as a table: validation accuracy of the chosen strategy per bin and budget."""
        self._check_fitted()
        lines = ["budget  " + "  ".join(f"bin {b + 1} (easiest)" if b == 0 else f"bin {b + 1}"
                                       for b in range(self.bins))]
        for b, budget in enumerate(self.budgets):
            cells = [f"{self.strategies[s].name} {self.accuracy[b, i, s]:.2f}"
                     for i, s in enumerate(self.choice[b].tolist())]
            lines.append(f"{budget:6d}  " + "  ".join(cells))
        return "\n".join(lines)

    def _probe_options(self) -> dict:
        return {key: value for key, value in self.options.items()
                if key in ("aggregate", "answer_fn", "temperature", "max_tokens", "step_delimiter", "prompt_fn")}

    def _check_fitted(self) -> None:
        if self.choice is None:
            raise RuntimeError("ComputeOptimal is not fitted: call fit() on a validation set first")


def _merge(parts: list[tuple[torch.Tensor, SearchResult]], num_problems: int, probe: Spent) -> SearchResult:
    """Searches over disjoint subsets of the problems as one result in problem order."""
    members = torch.cat([m for m, _ in parts])
    position = torch.empty_like(members)
    position[members] = torch.arange(members.numel())  # where each problem sits in the concatenation
    results = [r for _, r in parts]
    completions = [c for r in results for c in r.completions]
    answers = [a for r in results for a in r.answers]
    counts = torch.cat([r.offsets[1:] - r.offsets[:-1] for r in results])
    owner = torch.repeat_interleave(members, counts)
    order = torch.sort(owner, stable=True).indices
    candidates = [c for r in results for c in r.candidates]
    candidate_answers = [a for r in results for a in r.candidate_answers]
    base = torch.cumsum(torch.tensor([0] + [len(r.candidates) for r in results[:-1]]), 0)
    chosen = torch.cat([torch.where(r.chosen >= 0, r.chosen + start, -1) for r, start in zip(results, base.tolist(),
                                                                                             strict=True)])
    new_index = torch.empty_like(order)
    new_index[order] = torch.arange(order.numel())
    chosen = chosen[position]
    chosen = torch.where(chosen >= 0, new_index[chosen.clamp(min=0)], -1)
    offsets = torch.zeros(num_problems + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(owner, minlength=num_problems), 0, out=offsets[1:])
    spent = probe
    for indices, result in parts:
        tokens = torch.zeros(num_problems, dtype=torch.int64)
        tokens[indices] = result.spent.tokens_per_problem
        spent = spent + replace(result.spent, tokens_per_problem=tokens)
    position_list = position.tolist()
    order_list = order.tolist()
    return SearchResult(
        completions=[completions[p] for p in position_list],
        answers=[answers[p] for p in position_list],
        chosen=chosen,
        candidates=[candidates[i] for i in order_list],
        candidate_answers=[candidate_answers[i] for i in order_list],
        scores=torch.cat([r.scores for r in results])[order],
        offsets=offsets,
        spent=spent,
        strategy="",
    )
