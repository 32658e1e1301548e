"""Sequential revisions (Snell et al. 2024, sec. 6): parallel chains of attempts, each conditioned on the last.

n attempts per problem are spent as ``n / chain_length`` parallel chains of ``chain_length`` sequential
attempts: attempt k of a chain is generated with the chain's previous attempts (up to ``history`` of them)
in its prompt, which :func:`default_revision_prompt` (or the caller's ``revision_prompt``) writes. All
chains of all problems advance together: one generator call per revision round for the whole batch, one
verifier call at the end for every attempt. ``chain_length=1`` is plain parallel sampling (best-of-N);
``chain_length=n`` is purely sequential.

Selection is hierarchical, as in the paper: first the best answer within each chain (verifier-weighted or
majority vote; revisions can turn a right answer wrong, so the last attempt is only a baseline), then the
best across the chains' picks (weighted best-of-N or majority vote). Both levels are one
``fastsearch.vote`` launch each, batched over every chain and problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import chain, repeat

import numpy as np
import torch

import fastsearch
from fastsearch.checks import check_callable, check_choice, check_int
from fastsearch.search.run import SearchRun, answer_keys, async_entry, search_entry
from fastsearch.search.types import AnswerVerifier, Generator, SearchResult, StepVerifier, extract_answer

SELECT = ("verifier", "majority", "last")
ACROSS = ("weighted", "majority")

_PREVIOUS = "\n\nPrevious attempts at this problem (each may contain mistakes):\n\n"
_INSTRUCTION = "Write a new solution, step by step, correcting any mistake in the attempts above.\n\n"
_TEMPLATES: dict[int, str] = {}  # number of attempts shown -> str.format template (one C call per prompt)


def _template(count: int) -> str:
    shown = "\n\n".join(f"Attempt {k}:\n{{}}" for k in range(1, count + 1))
    return _TEMPLATES.setdefault(count, "{}" + _PREVIOUS + shown + "\n\n" + _INSTRUCTION)


def default_revision_prompt(problem: str, previous_attempts: Sequence[str]) -> str:
    """The prompt for a chain's next attempt: the problem, the previous attempts in order, an instruction.

    With no previous attempt it is ``problem + "\\n\\n"`` (what :func:`best_of_n` sends). Otherwise::

        <problem>

        Previous attempts at this problem (each may contain mistakes):

        Attempt 1:
        <oldest attempt shown>

        Attempt 2:
        ...

        Write a new solution, step by step, correcting any mistake in the attempts above.

    Args:
        problem: the problem text.
        previous_attempts: the chain's earlier attempts (generated texts), oldest first, already cut to
            the ``history`` most recent.

    Returns:
        the prompt.
    """
    if not previous_attempts:
        return problem + "\n\n"
    template = _TEMPLATES.get(len(previous_attempts)) or _template(len(previous_attempts))
    return template.format(problem, *previous_attempts)


def _check_options(n, chain_length, select, across, history, revision_prompt, verifier):
    n = check_int("n", n)
    chain_length = check_int("chain_length", chain_length)
    if n % chain_length:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"chain_length must divide n: n={n} attempts cannot form chains of chain_length="
                         f"{chain_length} (divisors of n: {divisors})")
    history = check_int("history", history, minimum=0)
    check_choice("select", select, SELECT)
    if across is None:
        across = "majority" if verifier is None else "weighted"
    check_choice("across", across, ACROSS)
    check_callable("revision_prompt", revision_prompt)
    if verifier is None and (select == "verifier" or across == "weighted"):
        needs = "select='verifier'" if select == "verifier" else "across='weighted'"
        raise ValueError(f"verifier is None but {needs} needs verifier scores: give a verifier, or use "
                         "select='majority' / 'last' with across='majority'")
    return n, chain_length, history, across


@search_entry
def revisions(problems: Sequence[str], generator: Generator, verifier: AnswerVerifier | StepVerifier | None = None,
              *, n: int, chain_length: int, select: str = "verifier", across: str | None = None,
              revision_prompt: Callable[[str, Sequence[str]], str] = default_revision_prompt, history: int = 4,
              aggregate: str = "last", answer_fn: Callable[[str], str] = extract_answer, temperature: float = 0.8,
              max_tokens: int = 2048, step_delimiter: str = "\n\n", seed: int | None = None,
              progress: bool = False) -> SearchResult:
    """Sequential revisions: ``n / chain_length`` chains per problem of ``chain_length`` attempts each.

    Round k (k = 0 ... chain_length - 1) makes one generator call with one prompt per chain of every
    problem: ``revision_prompt(problem, previous)`` where ``previous`` is the chain's attempts so far, oldest
    first, the ``history`` most recent of them (round 0 and ``history=0``: none). Each prompt gets one full
    attempt (no stop string). After the last round one verifier call scores every attempt (none without a
    verifier), and the answer is selected in two levels:

    - within each chain: ``select="verifier"`` the answer with the largest sum of verifier scores over the
      chain's attempts (weighted best-of-N, the paper's verifier selection), ``"majority"`` the answer most of
      the chain's attempts give, ``"last"`` the chain's last attempt (a baseline: revisions can break a right
      answer). Ties go to the answer given latest; the chain's pick is its latest attempt with that answer.
    - across the chains' picks: ``across="weighted"`` the answer with the largest sum of the picks' scores,
      ``"majority"`` the answer most picks give (ties: the earlier chain).

    Args:
        problems: G problem strings.
        generator: a :class:`~fastsearch.search.Generator`.
        verifier: an :class:`~fastsearch.search.AnswerVerifier` (``score_completions``), or a
            :class:`~fastsearch.search.StepVerifier` whose step scores are aggregated by ``aggregate``; None
            when neither level of selection reads a score (``select`` ``"majority"`` or ``"last"`` with
            ``across="majority"``): then no verifier call is made and ``scores`` are NaN.
        n: attempts per problem (the generation budget).
        chain_length: attempts per chain (the sequential share); must divide n. 1: parallel sampling only;
            n: one chain.
        select: within-chain selection: ``"verifier"`` (default), ``"majority"`` or ``"last"``.
        across: across-chain selection: ``"weighted"`` or ``"majority"``; default ``"weighted"`` with a
            verifier, ``"majority"`` without.
        revision_prompt: ``(problem, previous_attempts) -> prompt str``; default
            :func:`default_revision_prompt`.
        history: how many of the chain's most recent attempts the prompt shows (>= 0).
        aggregate: how a step verifier's step scores become one score per attempt (as in :func:`best_of_n`).
        answer_fn: attempt text -> canonical answer (default :func:`~fastsearch.search.extract_answer`).
        temperature, max_tokens, seed, progress: as in :func:`best_of_n`.
        step_delimiter: where a step verifier cuts an attempt into steps.

    Returns:
        :class:`~fastsearch.search.SearchResult` with n candidates per problem: the attempts, chain by chain
        (chain c of problem g holds candidates ``g * n + c * chain_length`` onwards, in round order).
        ``info["chain_picks"]`` [G * n / chain_length] int64 is each chain's pick (flat candidate index),
        ``info["chains"]`` and ``info["chain_length"]`` the shape.

    Example:
        >>> result = revisions(problems, generator, prm, n=16, chain_length=4)   # 4 chains of 4 attempts
        >>> result.answers, result.spent.generator_calls                         # ..., 4 rounds
    """
    n, chain_length, history, across = _check_options(n, chain_length, select, across, history, revision_prompt,
                                                      verifier)
    chains = n // chain_length
    name = f"revisions(n={n}, chain_length={chain_length}, select={select}, across={across})"
    run = SearchRun(name, problems, generator, verifier, aggregate=aggregate, vote="none", answer_fn=answer_fn,
                    temperature=temperature, max_tokens=max_tokens, seed=seed, step_delimiter=step_delimiter,
                    prompt_fn=None, progress=progress, whole_attempts=True, verifier_optional=True)
    groups = run.num_problems
    chain_owner = np.repeat(np.arange(groups, dtype=np.int64), chains)  # [G * chains]
    chain_problems = list(map(run.problems.__getitem__, chain_owner.tolist()))
    no_history = [()] * chain_owner.size
    rounds: list[Sequence[str]] = []
    for round_index in run.steps(chain_length):
        shown_rounds = rounds[max(round_index - history, 0):] if history else []
        if revision_prompt is default_revision_prompt:
            prompts = _default_prompts(chain_problems, shown_rounds)
        else:
            # zip over the last rounds builds every chain's history tuple in C
            shown = list(zip(*shown_rounds, strict=True)) if shown_rounds else no_history
            prompts = list(map(revision_prompt, chain_problems, shown))
        if not all(map(isinstance, prompts, repeat(str))):
            wrong = next(i for i, prompt in enumerate(prompts) if not isinstance(prompt, str))
            raise TypeError(f"revision_prompt must return a str, got {type(prompts[wrong]).__name__} for chain "
                            f"{wrong % chains} of problem {wrong // chains}")
        texts, _, _ = yield from run.generate(prompts, chain_owner, n=1, stop=None)
        rounds.append(texts)
    attempts = list(chain.from_iterable(zip(*rounds, strict=True)))  # problem, chain, round order
    owner = np.repeat(np.arange(groups, dtype=np.int64), n)
    answers = list(map(run.answer_fn, attempts))
    keys = torch.from_numpy(answer_keys(answers))
    scores = (torch.full((len(attempts),), math.nan) if verifier is None
              else (yield from run.score_completions(owner, attempts)))
    picks = _chain_picks(keys, scores, chain_length, select)
    chosen = _across_chains(keys, scores, picks, groups, chains, across)
    offsets = torch.arange(0, groups * n + 1, n, dtype=torch.int64)
    return run.result(chosen, attempts, answers, scores, offsets,
                      info={"chain_picks": picks, "chains": chains, "chain_length": chain_length})



revisions_async = async_entry(revisions)

def _default_prompts(chain_problems: list[str], shown_rounds: list[Sequence[str]]) -> list[str]:
    """:func:`default_revision_prompt` of every chain at once: all chains show the same number of attempts in
    a round, so one template's ``format`` maps over the columns (no Python call per chain)."""
    if not shown_rounds:
        return list(map(str.__add__, chain_problems, repeat("\n\n")))
    template = _TEMPLATES.get(len(shown_rounds)) or _template(len(shown_rounds))
    return list(map(template.format, chain_problems, *shown_rounds))


def _chain_picks(keys: torch.Tensor, scores: torch.Tensor, chain_length: int, select: str) -> torch.Tensor:
    """[C] int64 flat index of each chain's pick among its ``chain_length`` consecutive attempts.

    The attempts are handed to the kernels latest first (``flip``), so that ties go to the later attempt.
    """
    num_chains = keys.numel() // chain_length
    last = torch.full((num_chains,), chain_length - 1, dtype=torch.int64)
    if select == "last" or chain_length == 1:
        within = last
    else:
        method = "weighted" if select == "verifier" else "majority"
        winner = fastsearch.vote(keys.view(num_chains, chain_length).flip(-1),
                                 scores.view(num_chains, chain_length).flip(-1) if method == "weighted" else None,
                                 method=method)
        within = torch.where(winner >= 0, chain_length - 1 - winner, last)  # a chain scored all NaN keeps its last
    return torch.arange(0, keys.numel(), chain_length, dtype=torch.int64) + within


def _across_chains(keys: torch.Tensor, scores: torch.Tensor, picks: torch.Tensor, groups: int, chains: int,
                   across: str) -> torch.Tensor:
    """[G] int64 flat index of each problem's answer among the chains' picks; -1 where none can be chosen."""
    if chains == 1:
        return picks
    pick_keys = keys[picks].view(groups, chains)
    pick_scores = scores[picks].view(groups, chains) if across == "weighted" else None
    winner = fastsearch.vote(pick_keys, pick_scores, method=across)
    chosen = picks.view(groups, chains).gather(1, winner.clamp(min=0)[:, None])[:, 0]
    return torch.where(winner >= 0, chosen, -1)
