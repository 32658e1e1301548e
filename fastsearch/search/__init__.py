"""Batched test-time search with LLMs: best-of-N, beam search, DVTS, particle filtering, compute-optimal.

Every algorithm takes a batch of problems, a :class:`Generator` and a :class:`StepVerifier` (any objects
with ``generate`` / ``score`` methods), makes one generator call and one verifier call per step for all
problems together, and returns a :class:`SearchResult` with what it spent.
"""

from fastsearch.search.algorithms import beam_search, best_of_n, dvts, particle_filter
from fastsearch.search.compute_optimal import ComputeOptimal, Strategy, default_strategies
from fastsearch.search.types import Completion, Generator, SearchResult, Spent, StepVerifier, extract_answer

__all__ = [
    "Completion",
    "ComputeOptimal",
    "Generator",
    "SearchResult",
    "Spent",
    "StepVerifier",
    "Strategy",
    "beam_search",
    "best_of_n",
    "default_strategies",
    "dvts",
    "extract_answer",
    "particle_filter",
]
