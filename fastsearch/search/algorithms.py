"""Best-of-N, step-level beam search, diverse verifier tree search and particle filtering, batched.

Every algorithm runs all problems of a batch together: each step makes one generator call (plus one per
lookahead step) and one verifier call for every beam of every problem, and takes its decisions on tensors
with the fastsearch ops (``beam_prune``, ``segmented_topk``, ``vote``, ``resample``,
``effective_sample_size``, ``aggregate_steps``): no Python sort and no loop over problems or beams.

Semantics follow the reference implementation of PRM-guided search (Snell et al. 2024 and its open
reproduction, which runs one problem at a time), with these documented differences:

- Lookahead: the reference's beam search rolls each candidate ``lookahead`` steps further but scores the
  step alone; here the candidate is scored together with its rollout (as its DVTS does), then only the
  step is kept.
- Beam refill: survivors repeat in score order (``beam_prune``'s layout: survivor j fills slots j, j + c,
  ...), so when the survivors do not divide n the best ones get the extra copy; the reference repeats them
  in candidate order.
- Final beams: the completed beams are sorted by score and the best n kept, as the reference does, but
  not padded back to n by repeating them.
- Particle filtering resamples only when the effective sample size falls below ``ess_threshold * n`` (with
  systematic resampling by default), where the reference resamples multinomially every step; stopped
  particles take part in resampling with their final weight, and a copy of a stopped particle stays
  stopped (it is never revived to generate more).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import add

import numpy as np
import torch

import fastsearch
from fastsearch.checks import check_choice, check_float, check_int
from fastsearch.ops.particles import RESAMPLE_METHODS
from fastsearch.ops.score import LOGIT_CLIP
from fastsearch.search.run import Plan, SearchRun, as_numpy, async_entry, search_entry, split_steps
from fastsearch.search.types import AnswerVerifier, Generator, SearchResult, StepVerifier, extract_answer
from fastsearch.seeding import Stream, derive_seed


def _beam_options(n, beam_width, max_steps, lookahead) -> tuple[int, int, int, int]:
    n = check_int("n", n)
    beam_width = check_int("beam_width", beam_width)
    if n % beam_width:
        raise ValueError(f"n must be divisible by beam_width: n={n} beams cannot form groups of beam_width="
                         f"{beam_width} (try n={n - n % beam_width or beam_width})")
    return n, beam_width, check_int("max_steps", max_steps), check_int("lookahead", lookahead, minimum=0)


def _scatter(target: list, positions: list[int], values: Sequence) -> None:
    """``target[positions[i]] = values[i]`` for every i, without a Python-level loop."""
    deque(map(target.__setitem__, positions, values), maxlen=0)


def _children(run: SearchRun, prompts: Sequence[str], step_lists: Sequence[tuple[str, ...]], texts: Sequence[str],
              finished: np.ndarray, last: bool) -> tuple[list[str], list[tuple[str, ...]], np.ndarray]:
    """Each beam extended by its generated text: ``(prompts, step tuples, done [N] bool)``.

    A beam is done when generation ended with EOS, ran into ``max_tokens`` (it did not end with the step
    delimiter) or returned nothing; at the last step (generated without a stop string, to the end) every
    beam is done and its text may hold several steps.
    """
    # map() over C functions instead of comprehensions: this runs for every beam at every step.
    prompts = list(map(add, prompts, texts))
    if last:
        return prompts, list(map(add, step_lists, split_steps(texts, run.delimiter))), np.ones(len(texts), dtype=bool)
    steps = list(map(str.removesuffix, texts, repeat(run.delimiter)))
    stopped_at_delimiter = as_numpy(list(map(len, steps)), np.int64) < as_numpy(list(map(len, texts)), np.int64)
    return prompts, list(map(add, step_lists, zip(steps))), finished | ~stopped_at_delimiter


def _with_lookahead(run: SearchRun, prompts: Sequence[str], owner: np.ndarray,
                    step_lists: Sequence[tuple[str, ...]], done: np.ndarray, lookahead: int
                    ) -> Plan[Sequence[tuple[str, ...]]]:
    """The step lists to score: every open candidate's greedy ``lookahead``-step rollout appended.

    Rollouts run at temperature 0, one generator call per lookahead step for all open candidates, and
    stop early where a rollout step ends the solution.
    """
    rolling = np.flatnonzero(~done)
    if lookahead == 0 or rolling.size == 0:
        return step_lists
    rollouts = list(map(step_lists.__getitem__, rolling.tolist()))
    rollout_prompts = list(map(prompts.__getitem__, rolling.tolist()))
    going = np.arange(rolling.size)  # positions in ``rollouts`` still rolling
    for _ in range(lookahead):
        texts, _, finished = yield from run.generate(rollout_prompts, owner[rolling[going]], n=1,
                                                     stop=[run.delimiter], temperature=0.0)
        positions = going.tolist()
        extended, steps, rollout_done = _children(run, rollout_prompts, list(map(rollouts.__getitem__, positions)),
                                                  texts, finished, False)
        _scatter(rollouts, positions, steps)
        kept = np.flatnonzero(~rollout_done)
        going = going[kept]
        if going.size == 0:
            break
        rollout_prompts = list(map(extended.__getitem__, kept.tolist()))
    scored = list(step_lists)
    _scatter(scored, rolling.tolist(), rollouts)
    return scored


@search_entry
def best_of_n(problems: Sequence[str], generator: Generator, verifier: StepVerifier | AnswerVerifier | None, *,
              n: int, aggregate: str = "last", vote: str = "none", answer_fn: Callable[[str], str] = extract_answer,
              temperature: float = 0.8, max_tokens: int = 2048, step_delimiter: str = "\n\n",
              prompt_fn: Callable[[str], str] | None = None, seed: int | None = None,
              progress: bool = False, group=None) -> SearchResult:
    """Best-of-N: n full solutions per problem, scored by the verifier, one picked.

    One generator call (n samples of every problem, to the end) and one verifier call for the whole batch:
    a step verifier gets every solution cut at ``step_delimiter``, an answer verifier (ORM) every whole
    solution; identical solutions of one problem are scored once. With ``vote="majority"`` (self-consistency)
    the verifier may be None: then nothing is scored (``scores`` are NaN) and no verifier call is made.

    Args:
        problems: G problem strings.
        generator: a :class:`~fastsearch.search.Generator`.
        verifier: a :class:`~fastsearch.search.StepVerifier` or :class:`~fastsearch.search.AnswerVerifier`;
            None only with ``vote="majority"``.
        n: samples per problem.
        aggregate: how a solution's step scores become one score: ``"last"`` (default), ``"min"``,
            ``"prod"``, ``"mean"``, ``"max"`` or ``"logit_sum"``.
        vote: ``"none"`` (the best-scoring solution), ``"majority"`` (the most frequent answer; ties: the
            answer that reaches the top count first) or ``"weighted"`` (the answer with the largest sum of
            scores). With a vote, the chosen completion is the first member of the winning answer.
        answer_fn: completion text -> canonical answer (default :func:`~fastsearch.search.extract_answer`).
        temperature: sampling temperature.
        max_tokens: token limit of each generator call.
        step_delimiter: the text that ends a reasoning step.
        prompt_fn: problem -> the prompt's opening (e.g. a chat template); default ``problem + step_delimiter``.
        seed: makes the search deterministic (given a deterministic generator); None draws one from torch's
            default generator.
        progress: show a tqdm progress bar.

        group: a torch.distributed process group: split the problems over its ranks, each with its own
            generator and verifier; every rank returns the whole result (:mod:`fastsearch.search.sharding`).

    Returns:
        :class:`~fastsearch.search.SearchResult` with n candidates per problem.
    """
    n = check_int("n", n)
    if verifier is None and vote != "majority":
        raise ValueError(f"verifier is None: only vote='majority' (self-consistency) picks without scores, got "
                         f"vote={vote!r}")
    run = SearchRun(f"best_of_n(n={n})", problems, generator, verifier, aggregate=aggregate, vote=vote,
                    answer_fn=answer_fn, temperature=temperature, max_tokens=max_tokens, seed=seed,
                    step_delimiter=step_delimiter, prompt_fn=prompt_fn, progress=progress, whole_attempts=True,
                    verifier_optional=True)
    owner = np.arange(run.num_problems, dtype=np.int64)
    for _ in run.steps(1):
        texts, _, _ = yield from run.generate(run.prefixes, owner, n=n, stop=None)
        owner = np.repeat(owner, n)
        scores = (torch.full((len(texts),), math.nan) if verifier is None
                  else (yield from run.score_completions(owner, texts)))
    return run.finish(texts, owner, scores)


@search_entry
def beam_search(problems: Sequence[str], generator: Generator, verifier: StepVerifier, *, n: int, beam_width: int,
                max_steps: int = 40, lookahead: int = 0, step_delimiter: str = "\n\n", aggregate: str = "last",
                vote: str = "none", answer_fn: Callable[[str], str] = extract_answer, temperature: float = 0.8,
                max_tokens: int = 2048, dedup: bool = False, prompt_fn: Callable[[str], str] | None = None,
                seed: int | None = None, progress: bool = False, group=None) -> SearchResult:
    """PRM-guided step-level beam search over a batch of problems.

    n beams per problem each generate one step per iteration (the generator stops at ``step_delimiter``);
    the verifier scores every candidate; beams that completed (EOS, ``max_tokens`` or empty) leave the
    pool; of the others the best ``n / beam_width`` per problem survive and are repeated to refill n
    beams (``beam_width`` continuations each). Iteration ``max_steps`` generates each beam to its end.
    With ``lookahead=k`` every candidate is rolled k steps further greedily (temperature 0) and scored
    together with that rollout; only the step is kept. The completed beams, best n per problem by score,
    are the final candidates.

    Args:
        problems, generator, verifier: as in :func:`best_of_n`.
        n: beams per problem.
        beam_width: continuations per surviving beam (M); n must be divisible by it.
        max_steps: iterations; the last one completes every beam.
        lookahead: greedy rollout steps scored with each candidate (costs k more generator calls a step).
        step_delimiter, aggregate, vote, answer_fn, temperature, max_tokens, prompt_fn, seed, progress, group:
            as in :func:`best_of_n`.
        dedup: among candidates of a problem with identical text keep only the best-scoring one.

    Returns:
        :class:`~fastsearch.search.SearchResult` with up to n candidates per problem, best first.
    """
    n, beam_width, max_steps, lookahead = _beam_options(n, beam_width, max_steps, lookahead)
    name = f"beam_search(n={n}, beam_width={beam_width}" + (f", lookahead={lookahead})" if lookahead else ")")
    run = SearchRun(name, problems, generator, verifier, aggregate=aggregate, vote=vote, answer_fn=answer_fn,
                    temperature=temperature, max_tokens=max_tokens, seed=seed, step_delimiter=step_delimiter,
                    prompt_fn=prompt_fn, progress=progress)
    survivors = n // beam_width
    owner = np.repeat(np.arange(run.num_problems, dtype=np.int64), n)
    prompts = list(map(run.prefixes.__getitem__, owner.tolist()))
    step_lists: list[tuple[str, ...]] = [()] * owner.size
    offsets = torch.arange(0, owner.size + 1, n, dtype=torch.int64)
    pool_prompts: list[str] = []
    pool_owner, pool_scores = [], []
    for step in run.steps(max_steps):
        last = step == max_steps - 1
        texts, _, finished = yield from run.generate(prompts, owner, n=1, stop=None if last else [step_delimiter])
        prompts, step_lists, done = _children(run, prompts, step_lists, texts, finished, last)
        scored = step_lists if last else (yield from _with_lookahead(run, prompts, owner, step_lists, done,
                                                                     lookahead))
        scores = yield from run.score(owner, scored)
        completed = np.flatnonzero(done)
        pool_prompts += map(prompts.__getitem__, completed.tolist())
        pool_owner.append(owner[completed])
        pool_scores.append(scores[torch.from_numpy(completed)])
        if completed.size == done.size:
            break
        dedup_keys = torch.from_numpy(as_numpy(list(map(hash, prompts)), np.int64)) if dedup else None
        selection = fastsearch.beam_prune(scores, survivors, offsets=offsets, finished=torch.from_numpy(done),
                                          dedup_keys=dedup_keys, refill_to=n)
        # numpy for the small bookkeeping: a torch call costs microseconds of dispatch
        alive = selection.counts.numpy() > 0
        parents = selection.parents.numpy()[alive].reshape(-1)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(alive * n)]))
        chosen = parents.tolist()
        prompts = list(map(prompts.__getitem__, chosen))
        step_lists = list(map(step_lists.__getitem__, chosen))
        owner = owner[parents]
    pool_owner = np.concatenate(pool_owner)
    return run.finish(run.completions(pool_prompts, pool_owner), pool_owner, torch.cat(pool_scores), keep=n)


@search_entry
def dvts(problems: Sequence[str], generator: Generator, verifier: StepVerifier, *, n: int, beam_width: int,
         max_steps: int = 40, lookahead: int = 0, step_delimiter: str = "\n\n", aggregate: str = "last",
         vote: str = "none", answer_fn: Callable[[str], str] = extract_answer, temperature: float = 0.8,
         max_tokens: int = 2048, prompt_fn: Callable[[str], str] | None = None, seed: int | None = None,
         progress: bool = False, group=None) -> SearchResult:
    """Diverse verifier tree search: n / beam_width independent subtrees per problem, each greedy on the PRM.

    Every step each open subtree samples ``beam_width`` continuations of its beam (one generator call for
    all subtrees of all problems), the verifier scores them (with a ``lookahead`` rollout, as in
    :func:`beam_search`), and the subtree keeps its single best; a subtree whose best candidate completed
    stops there. The subtrees' final beams are the candidates.

    Args:
        problems, generator, verifier, aggregate, vote, answer_fn, temperature, max_tokens, step_delimiter,
            prompt_fn, seed, progress, group: as in :func:`best_of_n`.
        n: total continuations per problem per step; n / beam_width subtrees.
        beam_width: continuations per subtree per step (M); n must be divisible by it.
        max_steps, lookahead: as in :func:`beam_search`.

    Returns:
        :class:`~fastsearch.search.SearchResult` with n / beam_width candidates per problem (subtree order).
    """
    n, beam_width, max_steps, lookahead = _beam_options(n, beam_width, max_steps, lookahead)
    name = f"dvts(n={n}, beam_width={beam_width}" + (f", lookahead={lookahead})" if lookahead else ")")
    subtrees = n // beam_width
    run = SearchRun(name, problems, generator, verifier, aggregate=aggregate, vote=vote, answer_fn=answer_fn,
                    temperature=temperature, max_tokens=max_tokens, seed=seed, step_delimiter=step_delimiter,
                    prompt_fn=prompt_fn, progress=progress)
    subtree = np.arange(run.num_problems * subtrees, dtype=np.int64)
    owner = subtree // subtrees
    prompts = list(map(run.prefixes.__getitem__, owner.tolist()))
    step_lists: list[tuple[str, ...]] = [()] * subtree.size
    pool_prompts: list[str] = []
    pool_owner, pool_subtree, pool_scores = [], [], []
    for step in run.steps(max_steps):
        last = step == max_steps - 1
        texts, _, finished = yield from run.generate(prompts, owner, n=beam_width,
                                                     stop=None if last else [step_delimiter])
        parent = np.repeat(np.arange(subtree.size), beam_width).tolist()
        candidates, candidate_steps, done = _children(run, list(map(prompts.__getitem__, parent)),
                                                      list(map(step_lists.__getitem__, parent)), texts, finished,
                                                      last)
        candidate_owner = np.repeat(owner, beam_width)
        scored = candidate_steps if last else (yield from _with_lookahead(
            run, candidates, candidate_owner, candidate_steps, done, lookahead))
        scores = yield from run.score(candidate_owner, scored)
        # a subtree whose candidates all scored NaN takes its first one
        best = fastsearch.segmented_topk(scores.view(-1, beam_width), 1).indices[:, 0].numpy().clip(min=0)
        best += np.arange(0, scores.numel(), beam_width)
        best_done = done[best]
        stopped, going = np.flatnonzero(best_done), np.flatnonzero(~best_done)
        stopped_best = best[stopped]
        pool_prompts += map(candidates.__getitem__, stopped_best.tolist())
        pool_owner.append(owner[stopped])
        pool_subtree.append(subtree[stopped])
        pool_scores.append(scores[torch.from_numpy(stopped_best)])
        if going.size == 0:
            break
        chosen = best[going].tolist()
        prompts = list(map(candidates.__getitem__, chosen))
        step_lists = list(map(candidate_steps.__getitem__, chosen))
        owner, subtree = owner[going], subtree[going]
    pool_owner = np.concatenate(pool_owner)
    return run.finish(run.completions(pool_prompts, pool_owner), pool_owner, torch.cat(pool_scores),
                      order=np.concatenate(pool_subtree))


@search_entry
def particle_filter(problems: Sequence[str], generator: Generator, verifier: StepVerifier, *, n: int,
                    max_steps: int = 40, resample: str = "systematic", ess_threshold: float = 0.5,
                    step_delimiter: str = "\n\n", aggregate: str = "last", vote: str = "none",
                    answer_fn: Callable[[str], str] = extract_answer, temperature: float = 0.8, max_tokens: int = 2048,
                    prompt_fn: Callable[[str], str] | None = None, seed: int | None = None,
                    progress: bool = False, group=None) -> SearchResult:
    """Particle filtering with a PRM (Puri et al. 2025): n particles per problem, weighted by their score.

    Every step each open particle generates one step and is scored; its log-weight is
    ``logit(clip(score, 1e-7, 1 - 1e-7))``. When a problem's effective sample size falls below
    ``ess_threshold * n``, its n particles are resampled (``fastsearch.resample``) from all of them:
    stopped particles keep their final weight and take part, and a copy of a stopped particle stays
    stopped. Iteration ``max_steps`` generates every open particle to its end. The n particles are the
    final candidates.

    Args:
        problems, generator, verifier, aggregate, vote, answer_fn, temperature, max_tokens, step_delimiter,
            prompt_fn, seed, progress, group: as in :func:`best_of_n`.
        n: particles per problem.
        max_steps: as in :func:`beam_search`.
        resample: ``"systematic"`` (default), ``"multinomial"``, ``"stratified"`` or ``"residual"``.
        ess_threshold: resample when ESS < ``ess_threshold * n`` (1.0: nearly every step; 0: never).

    Returns:
        :class:`~fastsearch.search.SearchResult` with n candidates per problem.
    """
    n = check_int("n", n)
    max_steps = check_int("max_steps", max_steps)
    check_choice("resample", resample, RESAMPLE_METHODS)
    ess_threshold = check_float("ess_threshold", ess_threshold, low=0.0, high=1.0)
    run = SearchRun(f"particle_filter(n={n}, resample={resample}, ess_threshold={ess_threshold:g})", problems,
                    generator, verifier, aggregate=aggregate, vote=vote, answer_fn=answer_fn, temperature=temperature,
                    max_tokens=max_tokens, seed=seed, step_delimiter=step_delimiter, prompt_fn=prompt_fn,
                    progress=progress)
    groups = run.num_problems
    owner = np.repeat(np.arange(groups, dtype=np.int64), n)
    prompts = list(map(run.prefixes.__getitem__, owner.tolist()))
    step_lists: list[tuple[str, ...]] = [()] * owner.size
    done = np.zeros(owner.size, dtype=bool)
    scores = np.zeros(owner.size, dtype=np.float32)  # numpy: the per-step bookkeeping is small
    identity = np.arange(owner.size).reshape(groups, n)
    for step in run.steps(max_steps):
        last = step == max_steps - 1
        open_particles = np.flatnonzero(~done)
        picked = open_particles.tolist()
        open_prompts = list(map(prompts.__getitem__, picked))
        texts, _, finished = yield from run.generate(open_prompts, owner[open_particles], n=1,
                                                     stop=None if last else [step_delimiter])
        new_prompts, new_steps, new_done = _children(run, open_prompts, list(map(step_lists.__getitem__, picked)),
                                                     texts, finished, last)
        scores[open_particles] = (yield from run.score(owner[open_particles], new_steps)).numpy()
        _scatter(prompts, picked, new_prompts)
        _scatter(step_lists, picked, new_steps)
        done[open_particles] = new_done
        if done.all():
            break
        # A NaN score weighs as the worst score: resampling cannot order NaN. The clip is the one
        # aggregate_steps(method="logit_sum") applies, so that log-weights stay finite.
        clipped = np.clip(np.nan_to_num(scores, nan=0.0), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
        log_weights = torch.from_numpy(np.log(clipped) - np.log1p(-clipped)).view(groups, n)
        ess = fastsearch.effective_sample_size(log_weights).numpy()
        resampled = (ess < ess_threshold * n) & (~done).reshape(groups, n).any(-1)
        if not resampled.any():
            continue
        ancestors = fastsearch.resample(log_weights, n, method=resample,
                                        seed=derive_seed(run.seed, Stream.RESAMPLE, step)).numpy()
        ancestors = np.where(resampled[:, None], ancestors, identity).reshape(-1)
        chosen = ancestors.tolist()
        prompts = list(map(prompts.__getitem__, chosen))
        step_lists = list(map(step_lists.__getitem__, chosen))
        done, scores = done[ancestors], scores[ancestors]
    return run.finish(run.completions(prompts, owner), owner, torch.from_numpy(scores))


best_of_n_async = async_entry(best_of_n)
beam_search_async = async_entry(beam_search)
dvts_async = async_entry(dvts)
particle_filter_async = async_entry(particle_filter)
