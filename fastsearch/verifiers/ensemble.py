"""An ensemble of verifiers combined by rank, z-score or weighted mean (Ma et al. 2025's verifier ensemble)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

import fastsearch
from fastsearch.checks import check_callable, check_choice, check_float
from fastsearch.verifiers.base import Metered, MeteredVerifier, VerifierCost, cost_of

METHODS = ("rank", "zscore", "mean")


def check_offsets(offsets, count: int) -> torch.Tensor:
    """int64 [G + 1] from 0 to ``count``, every group non-empty."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be an int64 tensor [G + 1], got {getattr(offsets, 'dtype', type(offsets))}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must have shape [G + 1] with G >= 1, got {list(offsets.shape)}")
    host = offsets.cpu()
    if host[0] != 0 or host[-1] != count:
        raise ValueError(f"offsets must start at 0 and end at the number of images ({count}), got "
                         f"{int(host[0])} ... {int(host[-1])}")
    sizes = host[1:] - host[:-1]
    if bool((sizes <= 0).any()):
        group = int(torch.nonzero(sizes <= 0)[0])
        raise ValueError(f"offsets: group {group} is empty (or offsets decrease); every group needs a candidate")
    return offsets


class Ensemble(MeteredVerifier):
    """V verifiers as one: each scores the images, and their scores are combined per group of candidates.

    ``method``:

    - ``"rank"`` (Ma et al. 2025): each verifier ranks the candidates of a group from 1 (worst) to the group's size
      (best), ties sharing their mean rank and NaN ranking below every number; the score is the weighted mean rank.
      Immune to the verifiers' scales, and a verifier that is hacked (one huge score) moves a candidate one rank.
    - ``"zscore"``: each verifier's scores standardised per group, then the weighted mean.
    - ``"mean"``: the weighted mean of the raw scores (no groups; the scales must be comparable).

    Both group methods go through :func:`fastsearch.ensemble_scores`. A group is the candidates of one prompt (or
    image slot): the searches pass ``offsets=`` (and score a group's candidates in one call) because
    :attr:`groupwise` is True; called directly without ``offsets``, the whole batch is one group.

    Args:
        verifiers: V >= 1 callables ``verifier(images, **kwargs) -> [B]`` (every call's keyword arguments go to
            each). A verifier without a :class:`VerifierCost` ``cost`` is wrapped in :class:`Metered`.
        method: ``"rank"``, ``"zscore"`` or ``"mean"``.
        weights: V non-negative weights, not all zero; None weighs all equally.

    Example:
        >>> judge = Ensemble([CLIPScore(model, processor), AestheticScore(model, mlp)], method="rank")
        >>> judge(images, prompts=prompts, offsets=torch.tensor([0, 4, 8]))   # [8]: ranks within each prompt's 4
        >>> judge.cost, [member.cost for member in judge.verifiers]
    """

    def __init__(self, verifiers: Sequence[Callable], *, method: str = "rank",
                 weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if isinstance(verifiers, str) or not isinstance(verifiers, Sequence):
            raise TypeError(f"verifiers must be a sequence of verifiers, got {type(verifiers).__name__}")
        if not verifiers:
            raise ValueError("verifiers is empty: an ensemble needs at least one verifier")
        members = []
        for index, verifier in enumerate(verifiers):
            check_callable(f"verifiers[{index}]", verifier)
            members.append(verifier if cost_of(verifier) is not None else Metered(verifier))
        self.verifiers = tuple(members)
        self.method = check_choice("method", method, METHODS)
        self.weights = None if weights is None else self._check_weights(weights)

    def _check_weights(self, weights) -> tuple[float, ...]:
        if isinstance(weights, torch.Tensor):
            weights = weights.tolist() if weights.dim() == 1 else weights
        if isinstance(weights, str) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of {len(self.verifiers)} floats, got {type(weights).__name__}")
        if len(weights) != len(self.verifiers):
            raise ValueError(f"weights has {len(weights)} entries but there are {len(self.verifiers)} verifiers")
        checked = tuple(check_float(f"weights[{index}]", value, low=0.0) for index, value in enumerate(weights))
        if not math.fsum(checked) > 0:
            raise ValueError("weights must not all be zero")
        return checked

    @property
    def groupwise(self) -> bool:
        """True when a candidate's score depends on the others of its group (rank, zscore)."""
        return self.method != "mean"

    @property
    def cost(self) -> VerifierCost:
        """The members' costs, summed (calls, images scored by each, seconds)."""
        total = VerifierCost()
        for verifier in self.verifiers:
            total = total + verifier.cost
        return total

    def reset_cost(self) -> None:
        for verifier in self.verifiers:
            verifier.reset_cost()

    def member_scores(self, images, **kwargs) -> torch.Tensor:
        """Every verifier's scores of ``images``: [V, B] float32."""
        rows = self.count(images)
        scores = []
        for index, verifier in enumerate(self.verifiers):
            output = verifier(images, **kwargs)
            if not isinstance(output, torch.Tensor) or output.shape != (rows,):
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"verifiers[{index}] must return [B={rows}] scores, got {shape}")
            scores.append(output.detach().float())
        device = scores[0].device
        return torch.stack([score.to(device) for score in scores])

    def combine(self, scores: torch.Tensor, *, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """One score per candidate from the members' [V, N] ``scores``, per group of ``offsets`` ([G + 1] over N;
        None: one group). Returns [N] float32."""
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != len(self.verifiers):
            shape = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores must be [V={len(self.verifiers)}, N], got {shape}")
        if offsets is not None:
            offsets = check_offsets(offsets, scores.shape[1]).to(scores.device)
        if self.method == "mean":
            weights = torch.ones(len(self.verifiers)) if self.weights is None else torch.tensor(self.weights)
            weights = weights.to(scores.device)
            used = weights != 0  # a weight-0 verifier's NaN must not reach the mean
            return (torch.where(used[:, None], weights[:, None] * scores, 0.0).sum(0) / weights.sum()).float()
        return fastsearch.ensemble_scores(scores, offsets=offsets, method=self.method, weights=self.weights)

    def score(self, images, *, offsets: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """[B] combined scores of ``images`` (``offsets``: groups of candidates to rank within)."""
        if offsets is not None:
            check_offsets(offsets, self.count(images))
        return self.combine(self.member_scores(images, **kwargs), offsets=offsets)

    def __call__(self, images, *, offsets: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.score(images, offsets=offsets, **kwargs)

    def __repr__(self) -> str:
        return f"Ensemble({list(self.verifiers)!r}, method={self.method!r}, weights={self.weights})"
