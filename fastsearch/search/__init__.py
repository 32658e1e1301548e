"""Batched test-time search with LLMs: best-of-N, beam search, DVTS, particle filtering, sequential revisions,
compute-optimal.

Every algorithm takes a batch of problems, a :class:`Generator` and a verifier (a :class:`StepVerifier`
with ``score``, or for the searches that score whole attempts an :class:`AnswerVerifier` with
``score_completions``), makes one generator call and one verifier call per step (per revision round) for
all problems together, and returns a :class:`SearchResult` with what it spent.
"""

from fastsearch.search.algorithms import beam_search, best_of_n, dvts, particle_filter
from fastsearch.search.compute_optimal import ComputeOptimal, Strategy, default_strategies, revision_strategies
from fastsearch.search.revisions import default_revision_prompt, revisions
from fastsearch.search.types import (
    AnswerVerifier,
    Completion,
    Generator,
    SearchResult,
    Spent,
    StepVerifier,
    extract_answer,
)
from fastsearch.search.verifiers import AggregatedSteps

__all__ = [
    "AggregatedSteps",
    "AnswerVerifier",
    "Completion",
    "ComputeOptimal",
    "Generator",
    "SearchResult",
    "Spent",
    "StepVerifier",
    "Strategy",
    "beam_search",
    "best_of_n",
    "default_revision_prompt",
    "default_strategies",
    "dvts",
    "extract_answer",
    "particle_filter",
    "revision_strategies",
    "revisions",
]
