"""The LLM searches over a process group: the batch's problems split over the ranks, the results gathered.

With ``group=``, rank w of W runs the search on problems ``[G w // W, G (w + 1) // W)`` with its own generator
and verifier (one model replica a GPU, or a server each), and every rank returns the whole
:class:`~fastsearch.search.SearchResult`, problems in their original order. A problem's search does not depend
on the other problems of its batch (each step's decisions are per problem), so a rank's problems come out as
they would in one process whenever the generator's samples for a prompt do not depend on the other prompts of
its call (true of :class:`~fastsearch.models.reasoning.SimulatedGenerator`, and of vLLM with per-request seeds).
Two exceptions, where a rank's call numbering or group numbering differs from one process's: lookahead rollouts
(their number of generator calls depends on the problems in the batch), and particle filtering's resampling
uniforms (drawn per problem position in the batch) give valid but different draws.

``Spent`` is the sum over ranks (``generator_calls`` counts every rank's calls, ``tokens_per_problem`` is
concatenated), except ``wall_seconds``, the slowest rank's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fastsearch.checks import check_texts
from fastsearch.distributed import RankFailed, check_same_arguments
from fastsearch.search.types import SearchResult, Spent


def _merge_spent(parts: list[Spent]) -> Spent:
    total = Spent(tokens_per_problem=torch.cat([part.tokens_per_problem for part in parts]))
    for name in ("generated_tokens", "sequences", "generator_calls", "verifier_calls", "scored_steps",
                 "scored_completions", "generator_seconds", "verifier_seconds", "overhead_seconds"):
        setattr(total, name, sum(getattr(part, name) for part in parts))
    total.wall_seconds = max(part.wall_seconds for part in parts)
    return total


def _merge(parts: list[SearchResult]) -> SearchResult:
    """The ranks' results for consecutive problem shards as one result."""
    first_candidate, chosen, offsets = 0, [], [torch.zeros(1, dtype=torch.int64)]
    for part in parts:
        chosen.append(torch.where(part.chosen >= 0, part.chosen + first_candidate, part.chosen))
        offsets.append(part.offsets[1:] + first_candidate)
        first_candidate += len(part.candidates)
    return SearchResult(
        completions=[c for part in parts for c in part.completions],
        answers=[a for part in parts for a in part.answers],
        chosen=torch.cat(chosen),
        candidates=[c for part in parts for c in part.candidates],
        candidate_answers=[a for part in parts for a in part.candidate_answers],
        scores=torch.cat([part.scores for part in parts]),
        offsets=torch.cat(offsets),
        spent=_merge_spent([part.spent for part in parts]),
        strategy=parts[0].strategy,
        info=parts[0].info,
    )


def on_problem_shards(search: Callable[..., SearchResult], arguments: dict) -> SearchResult:
    """Run ``search(**arguments)`` (its own keyword arguments, ``group`` among them) on this rank's problems and
    return the merged result of every rank.

    The ranks first agree on every argument but the generator and verifier (one all_gather of a fingerprint
    per argument; a mismatch raises a ValueError naming it on every rank). A search that raises on any rank
    raises :class:`~fastsearch.distributed.RankFailed` on every rank.
    """
    arguments = dict(arguments)
    group = arguments.pop("group")
    problems = check_texts("problems", arguments.pop("problems"))
    if arguments.get("seed") is None:
        raise ValueError(f"{search.__name__} with group= needs a seed, the same on every rank")
    # functions (answer_fn, prompt_fn) compare by name: their repr holds an address that differs between processes
    checked = {name: getattr(value, "__qualname__", type(value).__name__) if callable(value) else value
               for name, value in arguments.items() if name not in ("generator", "verifier")}
    check_same_arguments(search.__name__, {"problems": problems, **checked}, group)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    low, high = len(problems) * rank // world_size, len(problems) * (rank + 1) // world_size
    try:
        outcome = search(problems[low:high], **arguments) if high > low else None
    except Exception as err:  # noqa: BLE001 - reported to every rank below
        outcome = err
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, outcome if not isinstance(outcome, Exception) else
                           f"{type(outcome).__name__}: {outcome}", group=group)
    failed = [w for w, part in enumerate(gathered) if isinstance(part, str)]
    if failed:
        message = f"{search.__name__} raised on rank(s) {failed}: {gathered[failed[0]]}"
        if isinstance(outcome, Exception):
            raise RankFailed(message) from outcome
        raise RankFailed(message)
    parts = [part for part in gathered if part is not None]
    return _merge(parts)
