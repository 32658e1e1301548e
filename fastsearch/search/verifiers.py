"""Verifier adapters: a step verifier (PRM) serving as an outcome verifier (ORM) by aggregating its scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import fastsearch
from fastsearch.checks import check_choice
from fastsearch.ops.score import AGGREGATIONS
from fastsearch.search.run import packed_scores, split_steps
from fastsearch.search.types import StepVerifier


class AggregatedSteps:
    """An :class:`~fastsearch.search.AnswerVerifier` made of a :class:`~fastsearch.search.StepVerifier`.

    Each whole attempt is cut into steps at ``step_delimiter``, the step verifier scores the steps (one
    call for all attempts), and the step scores are aggregated into one score per attempt by
    ``fastsearch.aggregate_steps``.

    Args:
        verifier: an object with ``score(problems, step_lists)``.
        aggregate: ``"last"`` (default), ``"min"``, ``"prod"``, ``"mean"``, ``"max"`` or ``"logit_sum"``.
        step_delimiter: the text that ends a reasoning step.

    Example:
        >>> orm = AggregatedSteps(reasoning.SimulatedPRM(), aggregate="min")
        >>> orm.score_completions(problems, completions)   # [N] float32
    """

    def __init__(self, verifier: StepVerifier, *, aggregate: str = "last", step_delimiter: str = "\n\n"):
        if not callable(getattr(verifier, "score", None)):
            raise TypeError(f"verifier must have a score(problems, step_lists) method, got {type(verifier).__name__}")
        if not isinstance(step_delimiter, str) or not step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty str, got {step_delimiter!r}")
        self.verifier = verifier
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATIONS)
        self.step_delimiter = step_delimiter

    def score_completions(self, problems: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Scores [N] float32, one per completion (``problems[i]`` is the problem of ``completions[i]``)."""
        if len(problems) != len(completions):
            raise ValueError(f"got {len(problems)} problems for {len(completions)} completions")
        step_lists = split_steps(completions, self.step_delimiter)
        expected = np.fromiter(map(len, step_lists), dtype=np.int64, count=len(step_lists))
        scores, offsets = packed_scores(self.verifier.score(list(problems), step_lists), expected)
        return fastsearch.aggregate_steps(scores, offsets=offsets, method=self.aggregate)
