"""Batched test-time search with LLMs: best-of-N, beam search, DVTS, particle filtering, sequential revisions,
compute-optimal.

Every algorithm takes a batch of problems, a :class:`Generator` and a verifier (a :class:`StepVerifier`
with ``score``, or for the searches that score whole attempts an :class:`AnswerVerifier` with
``score_completions``), makes one generator call and one verifier call per step (per revision round) for
all problems together, and returns a :class:`SearchResult` with what it spent. Each has an awaitable twin
(``beam_search_async`` ...) for servers that run many searches on one event loop.
"""

from fastsearch.search.algorithms import (
    beam_search,
    beam_search_async,
    best_of_n,
    best_of_n_async,
    dvts,
    dvts_async,
    particle_filter,
    particle_filter_async,
)
from fastsearch.search.compute_optimal import ComputeOptimal, Strategy, default_strategies, revision_strategies
from fastsearch.search.revisions import default_revision_prompt, revisions, revisions_async
from fastsearch.search.types import (
    AnswerVerifier,
    Completion,
    CompletionBatch,
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
    "CompletionBatch",
    "ComputeOptimal",
    "Generator",
    "SearchResult",
    "Spent",
    "StepVerifier",
    "Strategy",
    "beam_search",
    "beam_search_async",
    "best_of_n",
    "best_of_n_async",
    "default_revision_prompt",
    "default_strategies",
    "dvts",
    "dvts_async",
    "extract_answer",
    "particle_filter",
    "particle_filter_async",
    "revision_strategies",
    "revisions",
    "revisions_async",
]
