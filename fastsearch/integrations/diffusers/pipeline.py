"""Noise search through a diffusers pipeline: :func:`search_pipeline`."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.checks import check_callable
from fastsearch.diffusion.core import (
    BestSoFar,
    NoiseSearchResult,
    best_index,
    check_budget,
    count_within,
    is_groupwise,
    refuse_groupwise,
    selectable,
    zero_order_rounds,
)
from fastsearch.diffusion.options import (
    SEARCHES,
    FKSteering,
    PathsSearch,
    RandomSearch,
    SearchOptions,
    ZeroOrderSearch,
    search_options,
)
from fastsearch.integrations.diffusers.runner import PipelineRunner
from fastsearch.integrations.diffusers.steering import steered_search
from fastsearch.seeding import Stream, derive_seed, resolve_seed

# each option's field -> its class, to point a keyword of the flat signature this replaced at its new home
_OPTION_OWNERS = {field.name: options.__name__ for options in SEARCHES.values()
                  for field in dataclasses.fields(options)}


def search_pipeline(pipe, verifier: Callable, search: SearchOptions | str = "random", *, budget_nfe: int | None = None,
                    seed: int | None = None, decode: Callable | None = None, verifier_kwargs: dict | None = None,
                    progress: bool = True, **pipe_kwargs) -> NoiseSearchResult:
    """Noise search through a diffusers pipeline: over initial latents, over paths, or over particles.

    Each of the B images a plain call of the pipeline makes (whatever ``pipe_kwargs`` ask for: a batch, prompts
    x images per prompt) is an image slot, searched independently. ``search`` says which search and its options:
    one of the option objects of :mod:`fastsearch.diffusion` (below), or its name (``"random"``,
    ``"zero_order"``, ``"paths"``, ``"fk"``) for its defaults, which then need ``budget_nfe``.

    Searches over initial noises call the pipeline once per candidate, on latents chosen by the search (any
    pipeline that takes ``latents=``). The first call uses the latents the pipeline draws itself (so candidate 0
    is exactly the unsearched pipeline output); later latents come from fastsearch's Philox stream under ``seed``.

    - :class:`~fastsearch.diffusion.RandomSearch` ``(num_candidates)``: random search (best-of-N over initial
      noises, Ma et al. 2025), N calls; candidate c > 0 starts from ``derive_seed(seed, Stream.NOISE, c)``.
    - :class:`~fastsearch.diffusion.ZeroOrderSearch` ``(num_neighbors, cos_sim, iterations)``: zero-order search,
      the rounds of :func:`fastsearch.diffusion.zero_order_search` (the same code, the same streams): each round
      calls the pipeline on the pivot and on K neighbours at cosine ``cos_sim`` with the same norm; the best
      neighbour becomes the pivot if it beats the pivot strictly, else the next round restarts from fresh noise.

    Searches over paths and particles run in one pipeline call that makes every path or particle of every slot
    (``num_images_per_prompt`` or ``batch_size`` is multiplied, so each slot's rows are consecutive and share its
    conditioning). The scheduler is steered step by step: its timesteps are replaced by the search's plan, which
    may return to noisier states, and after each step the search may replace the latents. Supported schedulers:
    DDIM, DDPM and flow-matching Euler (and subclasses such as :class:`FastDDIMScheduler`). x0 predictions are
    scored mid-trajectory through ``decode`` (latents to the images the pipeline returns; by default
    :func:`default_decoder`, checked against the call's output images, an error if it does not reproduce them).

    - :class:`~fastsearch.diffusion.PathsSearch` ``(num_paths, branches, start_level, forward_interval,
      backward_interval)``: search over paths, as :func:`fastsearch.diffusion.paths_search` (states are indices
      into the pipeline's N timesteps), with one difference: the call's batch is fixed at n x M rows per slot, so
      the first stretch (states 0 to ``start_level``) denoises n x M fresh noises and keeps the best n of them
      (scored on their x0 predictions) before the first branching, where paths_search denoises n.
    - :class:`~fastsearch.diffusion.FKSteering` ``(num_particles, potential, lam, resample_every, ess_threshold,
      eta)``: FK steering, as :func:`fastsearch.diffusion.fk_steering`. It needs stochastic steps: DDIM steps run
      with ``eta`` (their noise comes from the search's stream), DDPM is stochastic, and a flow-matching scheduler
      must have ``stochastic_sampling=True``.

    NFEs are counted as pipeline steps x images (the rows the scheduler steps, so classifier-free guidance's
    doubled batch counts once, as diffusers' step count does) and reported per slot. While searching, the
    scheduler's ``step`` (and for paths / fk its ``set_timesteps``) is wrapped on the instance and restored
    afterwards, also when the pipeline raises.

    Args:
        pipe: a diffusers pipeline (taking ``latents=`` for random / zero-order search).
        verifier: ``verifier(images, **verifier_kwargs) -> [B]`` scores, higher is better, where ``images`` is
            what the pipeline returns as a tensor (numpy images are converted as they are): e.g. the verifiers of
            :mod:`fastsearch.verifiers` and :mod:`fastsearch.integrations.verifiers`, whose compute is reported in
            ``verifier_cost``. A rank or z-score :class:`~fastsearch.verifiers.Ensemble` ranks each slot's
            candidates against each other: paths and fk pass it ``offsets=`` over a slot's rows; random search
            keeps its members' scores of every call and ranks a slot's N candidates once all are made (``scores``
            and ``history`` then hold those final ensemble scores); zero-order search refuses it.
        search: a :class:`~fastsearch.diffusion.RandomSearch`, :class:`~fastsearch.diffusion.ZeroOrderSearch`,
            :class:`~fastsearch.diffusion.PathsSearch` or :class:`~fastsearch.diffusion.FKSteering`, or the name of
            one for its defaults.
        budget_nfe: NFEs per image slot instead of the search's count (``num_candidates``, ``iterations``,
            ``num_paths``, ``num_particles``): the most that fit. Paths and fk price it from
            ``num_inference_steps``.
        seed: int seed of the search's randomness (None: drawn from torch's generator). The pipeline's own
            randomness (its first latents, DDPM and flow step noise) follows its ``generator`` argument.
        decode: paths / fk: ``decode(latents) -> images`` like the pipeline's output.
        verifier_kwargs: keyword arguments for every verifier call (e.g. per-image labels; for paths / fk a
            tensor or list with one entry per slot is repeated for each of the slot's rows).
        progress: show a tqdm bar of pipeline calls (paths / fk: of steps).
        **pipe_kwargs: the pipeline's arguments (``output_type`` defaults to ``"pt"`` where it exists).

    Returns:
        :class:`fastsearch.diffusion.NoiseSearchResult` with ``sample`` [B, ...] the best images, ``score`` [B],
        ``scores`` every final image's scores ([B, calls]; paths [B, n M]; fk [B, n]), ``nfe`` per slot,
        ``total_nfe``, ``verifier_calls`` (mid-trajectory scoring included), ``verifier_cost`` (the verifier's
        :class:`~fastsearch.verifiers.VerifierCost`, when it reports one), ``noise`` [B, ...] the initial latents
        of each best image (random / zero-order; else None), and ``history``: one entry per call (random:
        ``{"round", "nfe", "best_score"}``), per round (zero-order: ``{"round", "nfe", "best_score", "round_best",
        "pivot", "moved", "restarted"}`` as zero_order_search's), per selection (paths: ``{"round", "state",
        "nfe", "best_score", "scores"}``, round -1 being the selection at ``start_level``) or per scoring step
        (fk: as fk_steering's history).

    Example:
        >>> from fastsearch.diffusion import FKSteering, RandomSearch
        >>> prompts = ["a red fox"] * 2
        >>> clip_score = CLIPScore(clip_model, clip_processor)     # fastsearch.integrations.verifiers
        >>> result = search_pipeline(pipe, clip_score, RandomSearch(num_candidates=8), prompt=prompts,
        ...                          verifier_kwargs={"prompts": prompts})
        >>> result.sample.shape, result.nfe                 # 2 best images, 8 x 50 NFEs per image
        >>> result = search_pipeline(pipe, clip_score, FKSteering(num_particles=4, lam=10.0), prompt=prompts,
        ...                          verifier_kwargs={"prompts": prompts})
        >>> result = search_pipeline(pipe, clip_score, "zero_order", budget_nfe=1000, prompt=prompts,
        ...                          verifier_kwargs={"prompts": prompts})
    """
    options = search_options(search)
    if not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    check_callable("verifier", verifier)
    if decode is not None:
        check_callable("decode", decode)
    parameters = inspect.signature(pipe).parameters
    for name in pipe_kwargs:
        if name in _OPTION_OWNERS and name not in parameters:
            raise TypeError(f"{name}= is an option of {_OPTION_OWNERS[name]}, not of the pipeline: pass "
                            f"search={_OPTION_OWNERS[name]}({name}=...)")
    if "latents" in pipe_kwargs:
        raise ValueError("latents are chosen by the search; do not pass latents= in pipe_kwargs")
    if "output_type" in parameters and "output_type" not in pipe_kwargs:
        pipe_kwargs["output_type"] = "pt"
    seed = resolve_seed(seed)
    verifier_kwargs = dict(verifier_kwargs or {})
    if isinstance(options, PathsSearch | FKSteering):
        return steered_search(pipe, verifier, options, parameters, pipe_kwargs, verifier_kwargs,
                              budget_nfe=budget_nfe, seed=seed, decode=decode, progress=progress)
    if "latents" not in parameters:
        raise ValueError(f"pipe ({type(pipe).__name__}) does not take latents=; search_pipeline needs a pipeline "
                         "whose __call__ accepts initial latents")
    check_budget(options, budget_nfe)  # before the first call
    if isinstance(options, ZeroOrderSearch):
        refuse_groupwise(verifier, "zero-order search through a pipeline")
    elif is_groupwise(verifier) and not (callable(getattr(verifier, "member_scores", None))
                                         and callable(getattr(verifier, "combine", None))):
        raise TypeError("verifier is groupwise but has no member_scores / combine: random search through a pipeline "
                        "scores one image per slot per call and must combine a slot's candidates at the end")
    with PipelineRunner(pipe, verifier, verifier_kwargs, pipe_kwargs) as run, \
            tqdm(desc=f"search_pipeline[{options.name}]", unit="call", disable=not progress) as bar, torch.no_grad():
        first = run(None)
        bar.update()
        if isinstance(options, RandomSearch):
            return _random_search(run, bar, first, options, budget_nfe, seed)
        return _zero_order_search(run, bar, first, options, budget_nfe, seed)


def _random_search(run: PipelineRunner, bar, first: tuple, options: RandomSearch, budget_nfe: int | None,
                   seed: int) -> NoiseSearchResult:
    images, scores, latents, cost = first
    count = count_within(options, budget_nfe, cost, "pipeline call")
    bar.total = count
    if run.groupwise:
        return _random_search_groupwise(run, bar, first, count, seed)
    best = BestSoFar()
    best.offer(images, scores, latents)
    all_scores = [scores]
    history = [{"round": 0, "nfe": run.tally.nfe, "best_score": best.score.clone()}]
    for candidate in range(1, count):
        fresh = fastsearch.randn(latents.shape, seed=derive_seed(seed, Stream.NOISE, candidate),
                                 device=latents.device, dtype=latents.dtype)
        images, scores, latents, _ = run(fresh)
        bar.update()
        best.offer(images, scores, latents)
        all_scores.append(scores)
        history.append({"round": candidate, "nfe": run.tally.nfe, "best_score": best.score.clone()})
    return run.tally.result(best.sample, best.score, torch.stack(all_scores, dim=1), history, noise=best.noise)


def _random_search_groupwise(run: PipelineRunner, bar, first: tuple, count: int, seed: int) -> NoiseSearchResult:
    """Random search with a rank / z-score ensemble: every call's member scores are kept, and each slot's N
    candidates are ranked against each other once all are made (the paper's ensemble, over a prompt's candidates)."""
    images, _, latents, _ = first
    all_images, all_latents, nfes = [images], [latents], [run.tally.nfe]
    for candidate in range(1, count):
        fresh = fastsearch.randn(latents.shape, seed=derive_seed(seed, Stream.NOISE, candidate),
                                 device=latents.device, dtype=latents.dtype)
        images, _, latents, _ = run(fresh)
        bar.update()
        all_images.append(images)
        all_latents.append(latents)
        nfes.append(run.tally.nfe)
    members = torch.stack(run.member_scores, dim=-1)  # [V, B, N]: slot-major candidates after flattening
    slots = members.shape[1]
    offsets = torch.arange(0, slots * count + 1, count, device=members.device)
    scores = run.verifier.combine(members.flatten(1), offsets=offsets).view(slots, count).float()
    best = best_index(scores)
    stacked = torch.stack(all_images, dim=1).flatten(0, 1)
    noises = torch.stack(all_latents, dim=1).flatten(0, 1)
    running = selectable(scores).cummax(dim=1).values
    history = [{"round": candidate, "nfe": nfes[candidate], "best_score": running[:, candidate]}
               for candidate in range(count)]
    return run.tally.result(stacked[best.to(stacked.device)], scores.flatten()[best], scores, history,
                            noise=noises[best.to(noises.device)])


def _zero_order_search(run: PipelineRunner, bar, first: tuple, options: ZeroOrderSearch, budget_nfe: int | None,
                       seed: int) -> NoiseSearchResult:
    images, scores, latents, cost = first
    width = options.width
    rounds = count_within(options, budget_nfe, cost * width, f"round of num_neighbors + 1 = {width} pipeline calls")
    bar.total = rounds * width

    def evaluate(candidates: torch.Tensor, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one pipeline call per candidate column; round 0's pivot is the pipeline's own first call
        outputs = [(images, scores)] if round_index == 0 else []
        for column in range(len(outputs), width):
            column_images, column_scores, _, _ = run(candidates[:, column])
            bar.update()
            outputs.append((column_images, column_scores))
        return torch.stack([out[0] for out in outputs], dim=1), torch.stack([out[1] for out in outputs], dim=1)

    return zero_order_rounds(options, rounds, latents, seed=seed, evaluate=evaluate, tally=run.tally)
