"""What every noise search is built from, once: its result, budget accounting, ranking and row selection,
best-so-far tracking and the zero-order round.

Both the tensor-level searches (:mod:`fastsearch.diffusion.search`) and the searches through a diffusers
pipeline (:mod:`fastsearch.integrations.diffusers`) are written with these, so the two agree on semantics (ties,
NaN scores, budgets) and on the random streams they draw from (:class:`fastsearch.seeding.Stream`).

Layout: a search runs S slots at once (prompts, or a pipeline's images), with C candidates per slot laid out
slot-major (row ``s * C + c``); scores are float32 [S, C].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastsearch
from fastsearch.checks import check_optional_int
from fastsearch.diffusion.options import SearchOptions, ZeroOrderSearch
from fastsearch.seeding import Stream, derive_seed
from fastsearch.verifiers.base import VerifierCost, cost_of


@dataclass(repr=False)
class NoiseSearchResult:
    """What a noise search found per prompt (or image slot) and what it spent.

    Attributes:
        sample: [P, *shape] the best final sample of each prompt.
        score: [P] float32 its verifier score.
        scores: [P, M] float32 verifier scores of the final (fully denoised) candidates, in evaluation order
            (random search: the N candidates; zero-order: every round's pivot and neighbours; paths: the last
            round's branches; FK: the final particles). NaN scores are kept here and never selected as best.
        nfe: NFEs spent per prompt (exact: every prompt spends the same).
        total_nfe: NFEs spent over all prompts (``nfe * P``).
        verifier_calls: samples scored by the verifier, over all prompts.
        history: one dict per round (or per scoring step for FK steering); keys per algorithm, in its docstring.
        noise: [P, *shape] the initial noise of each best sample (random / zero-order search), else None.
        verifier_cost: what the verifier spent during the search (calls, images, seconds), when it reports its
            cost (the verifiers of :mod:`fastsearch.verifiers`; wrap any other in
            :class:`~fastsearch.verifiers.Metered`), else None.
    """

    sample: torch.Tensor
    score: torch.Tensor
    scores: torch.Tensor
    nfe: int
    total_nfe: int
    verifier_calls: int
    history: list[dict] = field(default_factory=list)
    noise: torch.Tensor | None = None
    verifier_cost: VerifierCost | None = None

    def __repr__(self) -> str:
        cost = "" if self.verifier_cost is None else f", verifier_cost={self.verifier_cost}"
        return (f"NoiseSearchResult(sample={list(self.sample.shape)}, scores={list(self.scores.shape)}, "
                f"nfe={self.nfe}, total_nfe={self.total_nfe}, verifier_calls={self.verifier_calls}{cost}, "
                f"history={len(self.history)} entries)")


class Tally:
    """What a search has spent so far: NFEs and verifier calls over all its ``slots``, and the ``verifier``'s own
    cost since the tally began (when it reports one)."""

    def __init__(self, slots: int | None = None, verifier=None):
        self.slots = slots
        self.total_nfe = 0
        self.verifier_calls = 0
        self.verifier = verifier
        self.verifier_cost_at_start = cost_of(verifier)

    @property
    def verifier_cost(self) -> VerifierCost | None:
        """The verifier's cost since the tally began, or None when it reports none."""
        now = cost_of(self.verifier)
        if now is None or self.verifier_cost_at_start is None:
            return None
        return now - self.verifier_cost_at_start

    @property
    def nfe(self) -> int:
        """NFEs spent per slot (every slot spends the same)."""
        return self.total_nfe // (self.slots or 1)

    def result(self, sample: torch.Tensor, score: torch.Tensor, scores: torch.Tensor, history: list[dict],
               noise: torch.Tensor | None = None) -> NoiseSearchResult:
        return NoiseSearchResult(sample=sample, score=score, scores=scores, nfe=self.nfe, total_nfe=self.total_nfe,
                                 verifier_calls=self.verifier_calls, history=history, noise=noise,
                                 verifier_cost=self.verifier_cost)


# -- budgets ------------------------------------------------------------------------------------------------------


def check_budget(options: SearchOptions, budget_nfe) -> int | None:
    """Exactly one of the options' count and ``budget_nfe`` must be given; returns the checked budget (or None)."""
    if (getattr(options, options.count_name) is None) == (budget_nfe is None):
        raise ValueError(f"give exactly one of {options.count_name} and budget_nfe")
    return check_optional_int("budget_nfe", budget_nfe)


def count_within(options: SearchOptions, budget_nfe, cost: int, unit: str) -> int:
    """The options' count, or the most units of ``cost`` NFEs (per slot) that ``budget_nfe`` pays for."""
    budget = check_budget(options, budget_nfe)
    if budget is None:
        return getattr(options, options.count_name)
    if budget < cost:
        raise ValueError(f"budget_nfe={budget} is smaller than one {unit} ({cost} NFEs)")
    return budget // cost


def is_groupwise(verifier) -> bool:
    """True for a verifier whose scores compare the candidates of a group (a rank or z-score
    :class:`~fastsearch.verifiers.Ensemble`): the searches score a prompt's candidates in one call and pass
    ``offsets=`` [G + 1] over them."""
    return getattr(verifier, "groupwise", False) is True


def refuse_groupwise(verifier, search: str) -> None:
    """A groupwise verifier's scores of different calls cannot be compared: searches that compare them refuse it."""
    if is_groupwise(verifier):
        raise ValueError(f"verifier ranks candidates within a call ({getattr(verifier, 'method', 'groupwise')!r}), "
                         f"but {search} compares scores across calls: use an Ensemble with method='mean', or random "
                         "search, search over paths or FK steering, which score a prompt's candidates together")


# -- scores, ranking and row selection --------------------------------------------------------------------------


def check_scores(output, rows: int, unit: str) -> torch.Tensor:
    """A verifier's output for ``rows`` samples (or images) as float32 [rows], detached."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"verifier must return a tensor of scores, got {type(output).__name__}")
    if output.shape != (rows,):
        raise ValueError(f"verifier must return one score per {unit}, shape [{rows}], got {list(output.shape)}")
    return output.detach().float()


def selectable(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores rank below every other score (and below -inf) in selection."""
    return torch.where(torch.isnan(scores), torch.full_like(scores, -torch.inf), scores)


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat row index of each slot's k best candidates in [S, C] scores, best first (lower index on ties):
    int64 [S, k]."""
    local = fastsearch.segmented_topk(selectable(scores), k).indices
    return local + torch.arange(scores.shape[0], device=local.device)[:, None] * scores.shape[1]


def best_index(scores: torch.Tensor) -> torch.Tensor:
    """Flat row index of each slot's best candidate in [S, C] scores: int64 [S]."""
    return top_rows(scores, 1)[:, 0]


def where_rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise choice between [S, ...] tensors by an [S] bool mask."""
    return torch.where(mask.to(a.device).reshape((-1,) + (1,) * (a.dim() - 1)), a, b)


class BestSoFar:
    """The best sample, its score and its initial noise per slot among those offered; an earlier one wins ties."""

    def __init__(self):
        self.sample = self.score = self.noise = None

    def offer(self, sample: torch.Tensor, score: torch.Tensor, noise: torch.Tensor) -> None:
        """Candidates ``sample`` [S, ...] with ``score`` [S] from initial ``noise`` [S, ...], one per slot."""
        if self.score is None:
            self.sample, self.score, self.noise = sample, score, noise
            return
        better = selectable(score) > selectable(self.score)
        self.sample = where_rows(better, sample, self.sample)
        self.noise = where_rows(better, noise, self.noise)
        self.score = torch.where(better, score, self.score)


# -- zero-order search --------------------------------------------------------------------------------------------


def _take_rows(samples: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return samples.flatten(0, 1)[rows.to(samples.device)]


def zero_order_rounds(options: ZeroOrderSearch, rounds: int, pivot: torch.Tensor, *, seed: int,
                      evaluate: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                      tally: Tally, take: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _take_rows
                      ) -> NoiseSearchResult:
    """The rounds of zero-order search (Ma et al. 2025), whatever turns noises into scored samples.

    Each round: draw K neighbours of every slot's pivot at cosine ``options.cos_sim`` with the same norm
    (:func:`fastsearch.zo_neighbors`, seed ``derive_seed(seed, Stream.NEIGHBORS, round)``), evaluate the pivot and
    its neighbours, and keep the best sample so far. If the best neighbour beats the pivot strictly, it becomes the
    next pivot; else (ties keep the pivot) the next round restarts from fresh noise (seed ``derive_seed(seed,
    Stream.NOISE, round + 1)``; round 0's pivot is the caller's, by convention drawn with ``round = 0``).

    Args:
        options: K and the cosine.
        rounds: how many rounds.
        pivot: [S, *shape] the first round's pivots.
        seed: the search's seed.
        evaluate: ``evaluate(candidates, round) -> (samples, scores)`` with candidates [S, K + 1, *shape] (the
            pivot first), samples [S, K + 1, ...] and scores [S, K + 1]; it counts what it spends in ``tally``.
        tally: the search's spending, for the history and the result.
        take: ``take(samples, rows) -> [S, ...]`` the samples of flat candidate rows ``rows`` [S] from what
            ``evaluate`` returned (a distributed search returns its shard and fetches the winners from their ranks).

    Returns:
        :class:`NoiseSearchResult` with ``scores`` [S, rounds * (K + 1)] (per round: pivot, then neighbours),
        ``noise`` the initial noise of each best sample, and ``history`` per round ``{"round", "nfe", "best_score":
        [S] (so far), "round_best": [S], "pivot": [S, *shape] (this round's pivot), "moved": [S] bool (the next
        pivot is a neighbour), "restarted": [S] bool}``.
    """
    width = options.width
    best = BestSoFar()
    all_scores, history = [], []
    for round_index in range(rounds):
        around = fastsearch.zo_neighbors(pivot, options.num_neighbors, cos_sim=options.cos_sim,
                                         seed=derive_seed(seed, Stream.NEIGHBORS, round_index))
        candidates = torch.cat([pivot[:, None], around], dim=1).flatten(0, 1)
        samples, scores = evaluate(candidates.unflatten(0, (-1, width)), round_index)
        all_scores.append(scores)
        winner = best_index(scores)
        round_score = scores.flatten()[winner]
        best.offer(take(samples, winner), round_score,
                   candidates[winner.to(candidates.device)])
        moved = winner % width != 0
        history.append({"round": round_index, "nfe": tally.nfe, "best_score": best.score.clone(),
                        "round_best": round_score, "pivot": pivot, "moved": moved, "restarted": ~moved})
        if round_index + 1 < rounds:
            pivot = candidates[winner.to(candidates.device)]
            if not bool(moved.all()):
                fresh = fastsearch.randn(pivot.shape, seed=derive_seed(seed, Stream.NOISE, round_index + 1),
                                         device=pivot.device, dtype=pivot.dtype)
                pivot = where_rows(moved, pivot, fresh)
    return tally.result(best.sample, best.score, torch.cat(all_scores, dim=1), history, noise=best.noise)
