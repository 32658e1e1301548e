"""Inference-time search for diffusion and flow models: over initial noises, over paths, and over particles.

Every search takes ``model, verifier, sampler, shape`` and keyword options, runs P prompts at once (all
candidates of all prompts in one batched loop, model calls chunked by ``batch_size`` rows) and returns a
:class:`~fastsearch.diffusion.NoiseSearchResult` with what it spent. Compute is counted in NFEs: one per sample
per model evaluation. The options are checked by the option classes of :mod:`fastsearch.diffusion.options`, and
the searches are built from :mod:`fastsearch.diffusion.core` (which the pipeline searches share).

Protocol:
    ``model(x, level, **cond) -> output`` and ``verifier(x0, **cond) -> [B]`` scores (higher is better), see
    :mod:`fastsearch.diffusion.samplers`. ``shape`` is one sample's shape.

Prompts and conditioning:
    P is ``num_prompts`` when given; else the common first dimension of the tensors in ``cond`` (an error when
    they disagree); else 1. A tensor in ``cond`` whose first dimension is P is per-prompt: each candidate is
    passed its prompt's row (gathered per model / verifier call, never materialised for all candidates). Other
    values are passed unchanged. Keyword names of the search itself (``seed``, ``batch_size``, ...) cannot be
    used as conditioning names. Candidates are laid out prompt-major: row ``p * C + c``.

Budgets:
    ``budget_nfe`` is per prompt; each search derives its count (candidates, rounds, paths or particles) as the
    largest one whose cost fits, and ``NoiseSearchResult.nfe`` reports the exact NFEs spent per prompt (every
    prompt spends the same).

Randomness:
    Everything random (initial noises, neighbours, re-noising, step noise, resampling) comes from the Philox
    stream under seeds ``derive_seed(seed, stream, ...)`` with the streams of :class:`fastsearch.seeding.Stream`:
    the same seed, inputs and ``batch_size`` give the same result. ``seed=None`` draws one from torch's default
    generator.

Semantics (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps";
Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of Diffusion Models") are
given in each function's docstring, with the choices made where the papers leave options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.checks import FLOAT_DTYPES, check_callable, check_int, check_optional_int
from fastsearch.diffusion.batching import Conditioning, ModelCall, call_in_chunks
from fastsearch.diffusion.core import (
    NoiseSearchResult,
    Tally,
    best_index,
    check_scores,
    count_within,
    is_groupwise,
    refuse_groupwise,
    top_rows,
    zero_order_rounds,
)
from fastsearch.diffusion.options import FKSteering, PathsSearch, RandomSearch, ZeroOrderSearch
from fastsearch.diffusion.particles import ParticleWeights
from fastsearch.diffusion.samplers import Sampler, SamplerOutput
from fastsearch.distributed import Rows, check_same_arguments
from fastsearch.seeding import Stream, derive_seed, resolve_seed


def _num_prompts(cond: dict, num_prompts) -> int:
    if num_prompts is not None:
        return check_int("num_prompts", num_prompts)
    sizes = {value.shape[0] for value in cond.values() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(f"the tensors in cond have different first dimensions {sorted(sizes)}: pass num_prompts")
    return sizes.pop() if sizes else 1


def _shape_arg(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must be a sequence of ints (one sample's shape), got {shape!r}")
    if any(size < 1 for size in shape):
        raise ValueError(f"shape must hold positive sizes, got {list(shape)}")
    return tuple(shape)


class _Search:
    """State shared by the searches: checked arguments, the prompt layout, what was spent and the progress bar."""

    def __init__(self, name: str, model: Callable, verifier: Callable, sampler: Sampler, shape, cond: dict, *,
                 num_prompts, batch_size, seed, device, dtype, progress: bool, group=None):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a DDIMSampler or FlowSampler, got {type(sampler).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.name = name
        self.model = check_callable("model", model)
        self.verifier = check_callable("verifier", verifier)
        self.sampler = sampler
        self.shape = _shape_arg(shape)
        self.cond = cond
        self.num_prompts = _num_prompts(cond, num_prompts)
        self.batch_size = check_optional_int("batch_size", batch_size)
        self.group = group
        if group is not None and seed is None:
            raise ValueError(f"{name} with group= needs a seed, the same on every rank")
        if group is not None and is_groupwise(verifier):
            raise ValueError(f"{name} with group= cannot use a verifier that ranks candidates within a call: each "
                             "rank scores only its shard")
        self.seed = resolve_seed(seed)
        if device is None:
            device = next((v.device for v in cond.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = bool(progress)
        self.tally = Tally(self.num_prompts, verifier=self.verifier)
        self.bar = None

    def start(self, planned_nfe_per_prompt: int, options=None) -> None:
        if self.group is not None:  # one small collective: every rank must run the same search
            check_same_arguments(self.name, {"num_prompts": self.num_prompts, "shape": self.shape, "seed": self.seed,
                                             "dtype": self.dtype, "sampler": repr(self.sampler), "options": options,
                                             "planned_nfe_per_prompt": planned_nfe_per_prompt}, self.group)
        if self.progress:  # a disabled tqdm still costs a lock and a registry update per search
            self.bar = tqdm(total=planned_nfe_per_prompt * self.num_prompts, unit="nfe", desc=self.name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def rows(self, per_prompt: int) -> Rows:
        """The prompt-major [P * per_prompt] batch, split over the group (all here without one)."""
        return Rows(self.num_prompts * per_prompt, self.group)

    def prompt_rows(self, per_prompt: int) -> torch.Tensor:
        """The prompt of each row of a prompt-major [P * per_prompt] batch (this rank's rows with a group): int64 on
        the search's device."""
        return self.rows(per_prompt).local(torch.arange(self.num_prompts, device=self.device)
                                           .repeat_interleave(per_prompt))

    def noise(self, per_prompt: int, *key: int, whole: bool = False) -> torch.Tensor:
        """Fresh initial noise, [P * per_prompt, *shape]: with a group this rank's rows (from their stream
        positions), unless ``whole``."""
        rows = Rows(self.num_prompts * per_prompt, None if whole else self.group)
        return fastsearch.randn((rows.count, *self.shape), seed=derive_seed(self.seed, *key),
                                offset=rows.low * math.prod(self.shape), device=self.device, dtype=self.dtype)

    def denoise(self, x: torch.Tensor, prompts: torch.Tensor, start: int, stop: int, *key: int,
                rows: Rows | None = None) -> SamplerOutput:
        """Run every row of ``x`` from state ``start`` to ``stop``; rows take their prompt's conditioning. With a
        group, ``rows`` says which rows of the batch ``x`` holds (their step noise and the NFEs of the batch)."""
        call = ModelCall(self.model, Conditioning(self.cond, self.num_prompts, prompts), self.batch_size,
                         None if self.bar is None else self.bar.update)
        out = self.sampler.run(call, x, start, stop, derive_seed(self.seed, *key),
                               row_offset=None if rows is None else rows.row_offset)
        # with a group every rank counts the whole batch: rows of one run all take the same steps
        self.tally.total_nfe += out.nfe if rows is None or rows.group is None else \
            self.sampler.nfe(start, stop) * rows.total
        return out

    def score(self, x0: torch.Tensor, prompts: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        """Verifier scores of rows ``x0`` (each with its prompt's conditioning): [R] float32.

        A groupwise verifier (a rank ensemble) scores all rows in one call, with ``offsets=`` over the runs of
        rows of one prompt (rows are prompt-major). With a group, ``x0`` is this rank's shard of ``rows``: the
        scores of the whole batch come back on every rank, and a verifier that raises on any rank raises
        :class:`fastsearch.distributed.RankFailed` on all."""
        if rows is not None and rows.group is not None:
            scores = rows.gather_scores(f"{self.name}: the verifier", lambda: self.score(x0, prompts))
            self.tally.verifier_calls += rows.total - rows.count  # the local ones were counted
            return scores
        verifier, batch_size = self.verifier, self.batch_size
        if is_groupwise(verifier):
            _, counts = torch.unique_consecutive(prompts, return_counts=True)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

            def verifier(*args, **kwargs):
                return self.verifier(*args, offsets=offsets, **kwargs)

            batch_size = None
        scores = call_in_chunks(verifier, (x0,), Conditioning(self.cond, self.num_prompts, prompts),
                                slice(None), batch_size,
                                lambda output, chunk: check_scores(output, chunk.shape[0], "sample"))
        self.tally.verifier_calls += x0.shape[0]
        return scores


def _run_search(body: Callable[[_Search], NoiseSearchResult], name: str, model, verifier, sampler, shape,
                cond: dict, **options) -> NoiseSearchResult:
    search = _Search(name, model, verifier, sampler, shape, cond, **options)
    try:
        with torch.no_grad():
            return body(search)
    finally:
        search.close()


def random_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_candidates: int | None = None,
                  budget_nfe: int | None = None, num_prompts: int | None = None, batch_size: int | None = None,
                  seed: int | None = None, device=None, dtype: torch.dtype = torch.float32, progress: bool = True,
                  group=None, **cond) -> NoiseSearchResult:
    """Random search: best-of-N over initial noises (Ma et al. 2025).

    Draws N initial noises per prompt, samples each to the end, scores the samples and keeps the best.

    Args:
        model: the denoiser, ``model(x, level, **cond)``.
        verifier: ``verifier(x0, **cond) -> [B]`` scores, higher is better. One that reports a
            :class:`~fastsearch.verifiers.VerifierCost` (``.cost``) has its spending in ``verifier_cost``; a rank
            or z-score :class:`~fastsearch.verifiers.Ensemble` scores all rows in one call (``batch_size`` aside)
            with ``offsets=`` over each prompt's candidates (zero-order search refuses it: it compares scores of
            different calls).
        sampler: a :class:`~fastsearch.diffusion.DDIMSampler` or :class:`~fastsearch.diffusion.FlowSampler`.
        shape: one sample's shape (a sequence of ints).
        num_candidates: N >= 1 per prompt; or give ``budget_nfe`` (N = budget // NFEs per sample).
        budget_nfe: NFEs per prompt.
        num_prompts: P (default: from ``cond``, see the module docstring).
        batch_size: most rows per model / verifier call (None: all at once).
        seed: int (None: drawn from torch's generator).
        device, dtype: of the noise (default: the device of the ``cond`` tensors, else CPU; float32).
        progress: show a tqdm bar of NFEs.
        group: a ``torch.distributed`` process group to shard the candidates over (None: this process alone).
            Rank w samples and scores rows ``[R w // W, R (w + 1) // W)`` of the R = P N candidates with the
            noise of their global rows. Every rank returns the whole result, equal to one process's with the same
            ``seed`` (which is then required) for a model whose rows do not depend on each other and float32
            samples. ``verifier_cost`` is this rank's; the ranks must pass the same arguments (checked at the
            start), and a verifier that raises on one rank raises
            :class:`~fastsearch.distributed.RankFailed` on all.
        **cond: conditioning for the model and the verifier.

    Returns:
        :class:`~fastsearch.diffusion.NoiseSearchResult`; ``scores`` [P, N]; ``noise`` the best initial noises;
        ``history`` one entry ``{"round": 0, "nfe", "best_score": [P]}``.
    """
    options = RandomSearch(num_candidates)

    def body(search: _Search) -> NoiseSearchResult:
        per_sample = sampler.nfe()
        count = count_within(options, budget_nfe, per_sample, "sample")
        search.start(count * per_sample, options)
        rows = search.rows(count)
        prompts = search.prompt_rows(count)
        noise = search.noise(count, Stream.NOISE)
        out = search.denoise(noise, prompts, 0, sampler.num_steps, Stream.STEPS, rows=rows)
        scores = search.score(out.sample, prompts, rows).view(search.num_prompts, count)
        best = best_index(scores)
        score = scores.flatten()[best]
        history = [{"round": 0, "nfe": search.tally.nfe, "best_score": score}]
        return search.tally.result(rows.take(out.sample, best), score, scores, history, noise=rows.take(noise, best))

    return _run_search(body, "random_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress, group=group)


def no_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_prompts: int | None = None,
              batch_size: int | None = None, seed: int | None = None, device=None, dtype: torch.dtype = torch.float32,
              progress: bool = True, **cond) -> NoiseSearchResult:
    """The baseline: one sample per prompt, scored (``random_search`` with one candidate).

    To compare with a search at equal NFEs as Ma et al. do, give this baseline a sampler with more steps.
    Arguments and result as :func:`random_search`.
    """
    return random_search(model, verifier, sampler, shape, num_candidates=1, num_prompts=num_prompts,
                         batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress, **cond)


def zero_order_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_neighbors: int = 4,
                      iterations: int | None = None, cos_sim: float = 0.95, budget_nfe: int | None = None,
                      num_prompts: int | None = None, batch_size: int | None = None, seed: int | None = None,
                      device=None, dtype: torch.dtype = torch.float32, progress: bool = True,
                      group=None, **cond) -> NoiseSearchResult:
    """Zero-order search: move a pivot noise to its best neighbour (Ma et al. 2025).

    Each round, per prompt: draw K neighbours of the pivot at cosine ``cos_sim`` with the same norm
    (:func:`fastsearch.zo_neighbors`), sample the pivot and its neighbours to the end and score them. If the best
    neighbour beats the pivot, it becomes the next pivot; if none does, the next round restarts from fresh noise.
    The best sample over all rounds is returned. The rounds are :func:`fastsearch.diffusion.core.zero_order_rounds`,
    which the search through a pipeline runs too.

    Choices: the pivot is re-scored every round together with its neighbours (the authors' construction; with a
    stochastic sampler this re-draws its path), so a round costs exactly ``(K + 1)`` samples; a neighbour must
    beat the pivot strictly (ties keep the pivot, which then means a restart).

    Args:
        num_neighbors: K >= 1 per round.
        iterations: rounds >= 1; or give ``budget_nfe`` (rounds = budget // ((K + 1) NFEs per sample)).
        cos_sim: cosine similarity of the neighbours with the pivot, in [-1, 1].
        Others: as :func:`random_search`. ``shape`` must hold at least 2 elements.

    Returns:
        :class:`~fastsearch.diffusion.NoiseSearchResult`; ``scores`` [P, rounds * (K + 1)] (per round: pivot, then
        neighbours); ``noise`` the initial noise of each best sample; ``history`` per round ``{"round", "nfe",
        "best_score": [P] (so far), "round_best": [P], "pivot": [P, *shape] (this round's pivot), "moved": [P] bool
        (the next pivot is a neighbour), "restarted": [P] bool}``.
    """
    options = ZeroOrderSearch(num_neighbors=num_neighbors, cos_sim=cos_sim, iterations=iterations)

    def body(search: _Search) -> NoiseSearchResult:
        refuse_groupwise(search.verifier, "zero-order search")
        if math.prod(search.shape) < 2:
            raise ValueError(f"shape must hold at least 2 elements (neighbours at a cosine), got {list(search.shape)}")
        width = options.width
        per_sample = sampler.nfe()
        rounds = count_within(options, budget_nfe, width * per_sample, f"round of num_neighbors + 1 = {width} samples")
        search.start(rounds * width * per_sample, options)
        rows = search.rows(width)  # with a group: every rank draws the neighbours, and samples its share
        prompts = search.prompt_rows(width)

        def evaluate(candidates: torch.Tensor, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
            out = search.denoise(rows.local(candidates.flatten(0, 1)), prompts, 0, sampler.num_steps, Stream.STEPS,
                                 round_index, rows=rows)
            scores = search.score(out.sample, prompts, rows).view(search.num_prompts, width)
            return out.sample, scores

        return zero_order_rounds(options, rounds, search.noise(1, Stream.NOISE, 0, whole=True), seed=search.seed,
                                 evaluate=evaluate, tally=search.tally, take=rows.take)

    return _run_search(body, "zero_order_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress, group=group)


def paths_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_paths: int | None = None,
                 branches: int = 4, start_level: int | None = None, forward_interval: int | None = None,
                 backward_interval: int | None = None, budget_nfe: int | None = None, num_prompts: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, device=None,
                 dtype: torch.dtype = torch.float32, progress: bool = True, group=None, **cond) -> NoiseSearchResult:
    """Search over paths (Ma et al. 2025).

    Per prompt: draw ``num_paths`` (n) initial noises and denoise them to state ``start_level``. Then, each round,
    from state i: re-noise every kept path ``branches`` (M) times from state i to the noisier state
    ``max(i - forward_interval, 0)`` with the exact forward marginal (:meth:`Sampler.renoise`, i.e.
    :func:`fastsearch.renoise`), denoise each branch ``backward_interval`` steps (to the end at most), score the
    branches' x0 predictions (the samples themselves in the last round) and keep the top n per prompt
    (:func:`fastsearch.segmented_topk`). The best path of the last round is the result.

    States are step indices of the sampler's schedule (0 = pure noise, N = clean).

    Args:
        num_paths: n >= 1 kept paths per prompt; or give ``budget_nfe`` (n = budget // the cost of one path:
            its initial denoising plus M branches over every round).
        branches: M >= 1 re-noised branches per path per round.
        start_level: the state where branching starts, in [1, N - 1] (default N // 2).
        forward_interval: steps re-noised forward per round, >= 1 (default max(1, N // 10)).
        backward_interval: steps denoised per round, > forward_interval (default 2 * forward_interval).
        Others: as :func:`random_search`.

    Returns:
        :class:`~fastsearch.diffusion.NoiseSearchResult`; ``scores`` [P, n * M] the last round's scores;
        ``history`` per round ``{"round", "state" (where the branches ended), "nfe", "best_score": [P], "scores":
        [P, n * M]}``.
    """
    options = PathsSearch(num_paths=num_paths, branches=branches, start_level=start_level,
                          forward_interval=forward_interval, backward_interval=backward_interval)

    def body(search: _Search) -> NoiseSearchResult:
        steps, width = sampler.num_steps, options.branches
        plan = options.plan(steps)
        per_path = plan.path_cost(sampler, width)
        paths = count_within(options, budget_nfe, per_path, "path")
        search.start(paths * per_path, options)
        num_prompts = search.num_prompts
        path_rows, branch_rows = search.rows(paths), search.rows(paths * width)  # a group splits both batches
        out = search.denoise(search.noise(paths, Stream.NOISE), search.prompt_rows(paths), 0, plan.start,
                             Stream.STEPS, 0, rows=path_rows)
        x = out.sample
        branch_prompts = search.prompt_rows(paths * width)
        branch_parent = torch.arange(num_prompts * paths * width) // width
        history = []
        for round_index, (current, renoised, following) in enumerate(plan.rounds):
            branched = sampler.renoise(path_rows.exchange(x, branch_parent), current, renoised,
                                       seed=derive_seed(search.seed, Stream.RENOISE, round_index),
                                       row_offset=branch_rows.row_offset)
            out = search.denoise(branched, branch_prompts, renoised, following, Stream.STEPS, round_index + 1,
                                 rows=branch_rows)
            scored = out.sample if following == steps else out.pred_original_sample
            scores = search.score(scored, branch_prompts, branch_rows).view(num_prompts, paths * width)
            keep = top_rows(scores, paths)
            x = branch_rows.exchange(out.sample, keep.flatten())
            best_score = scores.flatten()[keep[:, 0]]
            history.append({"round": round_index, "state": following, "nfe": search.tally.nfe,
                            "best_score": best_score, "scores": scores})
        best_sample = path_rows.take(x, torch.arange(num_prompts) * paths)
        return search.tally.result(best_sample, best_score, scores, history)

    return _run_search(body, "paths_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress, group=group)


def fk_steering(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_particles: int | None = None,
                potential: str = "max", lam: float = 1.0, resample_every: int | None = None,
                ess_threshold: float = 0.5, budget_nfe: int | None = None, num_prompts: int | None = None,
                batch_size: int | None = None, seed: int | None = None, device=None,
                dtype: torch.dtype = torch.float32, progress: bool = True, group=None, **cond) -> NoiseSearchResult:
    """Feynman-Kac steering: sequential Monte Carlo over particles with verifier potentials (Singhal et al. 2025).

    Per prompt, ``num_particles`` (n) particles start from fresh noise and take stochastic sampler steps. After
    every ``resample_every``-th step (steps ``k - 1, 2k - 1, ...``) and after the last step, the verifier scores
    each particle's x0 prediction (``r``; the final sample after the last step) and its log-weight grows by the
    log-potential ``log G = lam * h``:

    - ``"max"``: h = the largest r of the particle's path so far;
    - ``"add"``: h = the sum of r over the path's scoring steps so far;
    - ``"diff"``: h = r - (the previous r of the path, 0 at first);
    - ``"r_t"``: h = r (the current reward only).

    At the last step the potential is ``lam * r(x0)`` divided by the product of the path's earlier potentials, so
    that the product of all potentials is ``exp(lam * r(x0))`` for every choice (for ``"diff"`` this is its own
    potential) and the weighted particles target ``p(x0) exp(lam r(x0))``. At each intermediate scoring step,
    prompts whose effective sample size (:func:`fastsearch.effective_sample_size` of the accumulated log-weights)
    is below ``ess_threshold * n`` resample their particles (:func:`fastsearch.resample`, systematic) together
    with their path statistics, and their log-weights restart at 0. The result is the final particle with the
    best verifier score. The bookkeeping is :class:`fastsearch.diffusion.particles.ParticleWeights`, which the
    search through a pipeline uses too.

    Args:
        sampler: must be stochastic: ``DDIMSampler(..., eta>0)`` or ``FlowSampler(..., stochastic=True)``.
        num_particles: n >= 1 per prompt; or give ``budget_nfe`` (n = budget // NFEs per sample).
        potential: ``"max"``, ``"add"``, ``"diff"`` or ``"r_t"``.
        lam: lambda >= 0, the potentials' inverse temperature.
        resample_every: k >= 1 steps between scoring / resampling points (default max(1, N // 10)).
        ess_threshold: in [0, 1]; 0 never resamples, 1 resamples unless the weights are exactly uniform.
        Others: as :func:`random_search`.

    Returns:
        :class:`~fastsearch.diffusion.NoiseSearchResult`; ``scores`` [P, n] the final particles' scores; ``history``
        per scoring step ``{"step", "nfe", "scores": [P, n], "log_weights": [P, n] (after this step's potential,
        before any resampling), "ess": [P], "resampled": [P] bool, "ancestors": [P, n] flat particle indices or
        None, "best_score": [P]}`` (the final entry has no ess / resampling: ``"ess"`` and ``"ancestors"`` are None
        and ``"resampled"`` all False).
    """
    options = FKSteering(num_particles=num_particles, potential=potential, lam=lam, resample_every=resample_every,
                         ess_threshold=ess_threshold)

    def body(search: _Search) -> NoiseSearchResult:
        if not sampler.stochastic:
            raise ValueError(f"fk_steering needs a stochastic sampler (DDIMSampler with eta > 0, or FlowSampler with "
                             f"stochastic=True); sampler is {sampler!r}")
        steps = sampler.num_steps
        per_sample = sampler.nfe()
        particles = count_within(options, budget_nfe, per_sample, "sample")
        search.start(particles * per_sample, options)
        num_prompts = search.num_prompts
        rows = search.rows(particles)  # with a group: each rank steps its share, weights are on every rank
        prompts = search.prompt_rows(particles)
        weights = ParticleWeights(num_prompts, particles, options, search.seed, search.device)
        x = search.noise(particles, Stream.NOISE)
        history = []
        for step in range(steps):
            out = search.denoise(x, prompts, step, step + 1, Stream.STEPS, step, rows=rows)
            x = out.sample
            if not options.scores_after(step, steps):
                continue
            final = step == steps - 1
            scores = search.score(x if final else out.pred_original_sample, prompts, rows)
            entry = weights.update(scores, step=step, nfe=search.tally.nfe, final=final)
            if not final:
                ancestors = weights.resample(entry)
                if ancestors is not None:
                    x = rows.exchange(x, ancestors)
            history.append(entry)
        final_scores = scores.view(num_prompts, particles)
        best = best_index(final_scores)
        return search.tally.result(rows.take(x, best), final_scores.flatten()[best], final_scores, history)

    return _run_search(body, "fk_steering", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress, group=group)
