"""Inference-time search for diffusion and flow models: over initial noises, over paths, and over particles.

Every search takes ``model, verifier, sampler, shape`` and keyword options, runs P prompts at once (all
candidates of all prompts in one batched loop, model calls chunked by ``batch_size`` rows) and returns a
:class:`SearchResult` with what it spent. Compute is counted in NFEs: one per sample per model evaluation.

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
    largest one whose cost fits, and ``SearchResult.nfe`` reports the exact NFEs spent per prompt (every prompt
    spends the same).

Randomness:
    Everything random (initial noises, neighbours, re-noising, step noise, resampling) comes from the Philox
    stream under seeds derived from ``seed``: the same seed, inputs and ``batch_size`` give the same result.
    ``seed=None`` draws one from torch's default generator.

Semantics (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps";
Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of Diffusion Models") are
given in each function's docstring, with the choices made where the papers leave options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import fastsearch
from fastsearch.diffusion.samplers import (
    Conditioning,
    Sampler,
    SamplerOutput,
    _ModelCall,
    _positive_int,
    call_in_chunks,
    derive_seed,
)
from fastsearch.ops._common import fresh_seed, seed_arg

# stream names under the search seed
_NOISE, _STEPS, _NEIGHBORS, _RENOISE, _RESAMPLE = range(5)
POTENTIALS = ("max", "add", "diff", "r_t")


@dataclass
class SearchResult:
    """What a search found and what it spent.

    Attributes:
        sample: [P, *shape] the best final sample of each prompt.
        score: [P] float32 its verifier score.
        scores: [P, M] float32 verifier scores of the final (fully denoised) candidates, in evaluation order
            (random search: the N candidates; zero-order: every round's pivot and neighbours; paths: the last
            round's branches; FK: the final particles). NaN scores are kept here and never selected as best.
        nfe: NFEs spent per prompt (exact: every prompt spends the same).
        total_nfe: NFEs spent over all prompts (``nfe * P``).
        verifier_calls: samples scored by the verifier, over all prompts.
        history: one dict per round (or per scoring step for FK steering); keys per algorithm, in its docstring.
        noise: [P, *shape] the initial noise of each best sample (random / zero-order search), else None.
    """

    sample: torch.Tensor
    score: torch.Tensor
    scores: torch.Tensor
    nfe: int
    total_nfe: int
    verifier_calls: int
    history: list[dict] = field(default_factory=list)
    noise: torch.Tensor | None = None


def _check_scores(output, x0: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"verifier must return a tensor of scores, got {type(output).__name__}")
    if output.shape != x0.shape[:1]:
        raise ValueError(f"verifier must return one score per sample, shape [{x0.shape[0]}], got "
                         f"{list(output.shape)}")
    return output.detach().float()


def _count(name: str, count, budget_nfe, cost: int, unit: str) -> int:
    """A search's count: given directly, or the largest whose ``cost`` each fits into ``budget_nfe``."""
    if budget_nfe is None:
        if count is None:
            raise ValueError(f"give {name} or budget_nfe")
        return _positive_int(name, count)
    if count is not None:
        raise ValueError(f"give {name} or budget_nfe, not both")
    budget = _positive_int("budget_nfe", budget_nfe)
    if budget < cost:
        raise ValueError(f"budget_nfe={budget} is smaller than one {unit} ({cost} NFEs)")
    return budget // cost


def _num_prompts(cond: dict, num_prompts) -> int:
    if num_prompts is not None:
        return _positive_int("num_prompts", num_prompts)
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


def _selectable(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores rank below every other score (and below -inf) in selection."""
    return torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)


def _best(scores: torch.Tensor) -> torch.Tensor:
    """Flat index of each row's best candidate in [P, C] scores (first on ties): [P] int64."""
    local = fastsearch.segmented_topk(_selectable(scores), 1)[1][:, 0]
    return local + torch.arange(scores.shape[0], device=scores.device) * scores.shape[1]


def _where_rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise choice between [P, ...] tensors by a [P] bool mask."""
    return torch.where(mask.reshape((-1,) + (1,) * (a.dim() - 1)), a, b)


class _Search:
    """State shared by the searches: checked arguments, the prompt layout, counters and the progress bar."""

    def __init__(self, name: str, model: Callable, verifier: Callable, sampler: Sampler, shape, cond: dict, *,
                 num_prompts, batch_size, seed, device, dtype, progress: bool):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a DDIMSampler or FlowSampler, got {type(sampler).__name__}")
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not callable(verifier):
            raise TypeError(f"verifier must be callable, got {type(verifier).__name__}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.name = name
        self.model = model
        self.verifier = verifier
        self.sampler = sampler
        self.shape = _shape_arg(shape)
        self.cond = cond
        self.num_prompts = _num_prompts(cond, num_prompts)
        self.batch_size = None if batch_size is None else _positive_int("batch_size", batch_size)
        self.seed = fresh_seed() if seed is None else seed_arg(seed)
        if device is None:
            device = next((v.device for v in cond.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = bool(progress)
        self.total_nfe = 0
        self.verifier_calls = 0
        self.bar = None

    def start(self, planned_nfe_per_prompt: int) -> None:
        if self.progress:  # a disabled tqdm still costs a lock and a registry update per search
            self.bar = tqdm(total=planned_nfe_per_prompt * self.num_prompts, unit="nfe", desc=self.name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def nfe(self) -> int:
        """NFEs spent per prompt so far."""
        return self.total_nfe // self.num_prompts

    def prompt_rows(self, per_prompt: int) -> torch.Tensor:
        """The prompt of each row of a prompt-major [P * per_prompt] batch: int64 on the search's device."""
        return torch.arange(self.num_prompts, device=self.device).repeat_interleave(per_prompt)

    def noise(self, per_prompt: int, *key: int) -> torch.Tensor:
        """Fresh initial noise, [P * per_prompt, *shape]."""
        return fastsearch.randn((self.num_prompts * per_prompt, *self.shape), seed=derive_seed(self.seed, *key),
                                device=self.device, dtype=self.dtype)

    def denoise(self, x: torch.Tensor, prompts: torch.Tensor, start: int, stop: int, *key: int) -> SamplerOutput:
        """Run every row of ``x`` from state ``start`` to ``stop``; rows take their prompt's conditioning."""
        call = _ModelCall(self.model, Conditioning(self.cond, self.num_prompts, prompts), self.batch_size,
                          None if self.bar is None else self.bar.update)
        out = self.sampler._run(call, x, start, stop, derive_seed(self.seed, *key))
        self.total_nfe += out.nfe
        return out

    def score(self, x0: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Verifier scores of rows ``x0`` (each with its prompt's conditioning): [R] float32."""
        scores = call_in_chunks(self.verifier, (x0,), Conditioning(self.cond, self.num_prompts, prompts),
                                slice(None), self.batch_size, _check_scores)
        self.verifier_calls += x0.shape[0]
        return scores

    def result(self, sample, score, scores, history, noise=None) -> SearchResult:
        return SearchResult(sample=sample, score=score, scores=scores, nfe=self.nfe, total_nfe=self.total_nfe,
                            verifier_calls=self.verifier_calls, history=history, noise=noise)


def _run_search(body: Callable[[_Search], SearchResult], name: str, model, verifier, sampler, shape, cond: dict,
                **options) -> SearchResult:
    search = _Search(name, model, verifier, sampler, shape, cond, **options)
    try:
        with torch.no_grad():
            return body(search)
    finally:
        search.close()


def random_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_candidates: int | None = None,
                  budget_nfe: int | None = None, num_prompts: int | None = None, batch_size: int | None = None,
                  seed: int | None = None, device=None, dtype: torch.dtype = torch.float32, progress: bool = True,
                  **cond) -> SearchResult:
    """Random search: best-of-N over initial noises (Ma et al. 2025).

    Draws N initial noises per prompt, samples each to the end, scores the samples and keeps the best.

    Args:
        model: the denoiser, ``model(x, level, **cond)``.
        verifier: ``verifier(x0, **cond) -> [B]`` scores, higher is better.
        sampler: a :class:`~fastsearch.diffusion.DDIMSampler` or :class:`~fastsearch.diffusion.FlowSampler`.
        shape: one sample's shape (a sequence of ints).
        num_candidates: N >= 1 per prompt; or give ``budget_nfe`` (N = budget // NFEs per sample).
        budget_nfe: NFEs per prompt.
        num_prompts: P (default: from ``cond``, see the module docstring).
        batch_size: most rows per model / verifier call (None: all at once).
        seed: int (None: drawn from torch's generator).
        device, dtype: of the noise (default: the device of the ``cond`` tensors, else CPU; float32).
        progress: show a tqdm bar of NFEs.
        **cond: conditioning for the model and the verifier.

    Returns:
        :class:`SearchResult`; ``scores`` [P, N]; ``noise`` the best initial noises; ``history`` one entry
        ``{"round": 0, "nfe", "best_score": [P]}``.
    """
    def body(search: _Search) -> SearchResult:
        per_sample = sampler.nfe()
        count = _count("num_candidates", num_candidates, budget_nfe, per_sample, "sample")
        search.start(count * per_sample)
        prompts = search.prompt_rows(count)
        noise = search.noise(count, _NOISE)
        out = search.denoise(noise, prompts, 0, sampler.num_steps, _STEPS)
        scores = search.score(out.sample, prompts).view(search.num_prompts, count)
        best = _best(scores)
        score = scores.flatten()[best]
        history = [{"round": 0, "nfe": search.nfe, "best_score": score}]
        return search.result(out.sample[best], score, scores, history, noise=noise[best])

    return _run_search(body, "random_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress)


def no_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_prompts: int | None = None,
              batch_size: int | None = None, seed: int | None = None, device=None, dtype: torch.dtype = torch.float32,
              progress: bool = True, **cond) -> SearchResult:
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
                      **cond) -> SearchResult:
    """Zero-order search: move a pivot noise to its best neighbour (Ma et al. 2025).

    Each round, per prompt: draw K neighbours of the pivot at cosine ``cos_sim`` with the same norm
    (:func:`fastsearch.zo_neighbors`), sample the pivot and its neighbours to the end and score them. If the best
    neighbour beats the pivot, it becomes the next pivot; if none does, the next round restarts from fresh noise.
    The best sample over all rounds is returned.

    Choices: the pivot is re-scored every round together with its neighbours (the authors' construction; with a
    stochastic sampler this re-draws its path), so a round costs exactly ``(K + 1)`` samples; a neighbour must
    beat the pivot strictly (ties keep the pivot, which then means a restart).

    Args:
        num_neighbors: K >= 1 per round.
        iterations: rounds >= 1; or give ``budget_nfe`` (rounds = budget // ((K + 1) NFEs per sample)).
        cos_sim: cosine similarity of the neighbours with the pivot, in [-1, 1].
        Others: as :func:`random_search`. ``shape`` must hold at least 2 elements.

    Returns:
        :class:`SearchResult`; ``scores`` [P, rounds * (K + 1)] (per round: pivot, then neighbours); ``noise`` the
        initial noise of each best sample; ``history`` per round ``{"round", "nfe", "best_score": [P] (so far),
        "round_best": [P], "pivot": [P, *shape] (this round's pivot), "moved": [P] bool (the next pivot is a
        neighbour), "restarted": [P] bool}``.
    """
    def body(search: _Search) -> SearchResult:
        neighbors = _positive_int("num_neighbors", num_neighbors)
        if not -1.0 <= float(cos_sim) <= 1.0:
            raise ValueError(f"cos_sim must be in [-1, 1], got {cos_sim}")
        if math.prod(search.shape) < 2:
            raise ValueError(f"shape must hold at least 2 elements (neighbours at a cosine), got {list(search.shape)}")
        width = neighbors + 1
        per_sample = sampler.nfe()
        rounds = _count("iterations", iterations, budget_nfe, width * per_sample,
                        f"round of num_neighbors + 1 = {width} samples")
        search.start(rounds * width * per_sample)
        prompts = search.prompt_rows(width)
        num_prompts = search.num_prompts
        pivot = search.noise(1, _NOISE, 0)
        best_sample = best_noise = best_score = None
        all_scores, history = [], []
        for round_index in range(rounds):
            around = fastsearch.zo_neighbors(pivot, neighbors, cos_sim=float(cos_sim),
                                             seed=derive_seed(search.seed, _NEIGHBORS, round_index))
            candidates = torch.cat([pivot[:, None], around], dim=1).reshape(num_prompts * width, *search.shape)
            out = search.denoise(candidates, prompts, 0, sampler.num_steps, _STEPS, round_index)
            scores = search.score(out.sample, prompts).view(num_prompts, width)
            all_scores.append(scores)
            best = _best(scores)
            round_score = scores.flatten()[best]
            if best_score is None:
                best_sample, best_noise, best_score = out.sample[best], candidates[best], round_score
            else:
                better = _selectable(round_score) > _selectable(best_score)
                best_sample = _where_rows(better, out.sample[best], best_sample)
                best_noise = _where_rows(better, candidates[best], best_noise)
                best_score = torch.where(better, round_score, best_score)
            moved = best % width != 0
            entry = {"round": round_index, "nfe": search.nfe, "best_score": best_score.clone(),
                     "round_best": round_score, "pivot": pivot, "moved": moved, "restarted": ~moved}
            history.append(entry)
            if round_index + 1 < rounds:
                next_pivot = candidates[best]
                if not bool(moved.all()):
                    next_pivot = _where_rows(moved, next_pivot, search.noise(1, _NOISE, round_index + 1))
                pivot = next_pivot
        return search.result(best_sample, best_score, torch.cat(all_scores, dim=1), history, noise=best_noise)

    return _run_search(body, "zero_order_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress)


def _path_rounds(num_steps: int, start_level: int, forward: int, backward: int) -> list[tuple[int, int, int]]:
    """The (state, re-noised state, next state) of every round of search over paths."""
    rounds, current = [], start_level
    while current < num_steps:
        renoised = max(current - forward, 0)
        following = min(renoised + backward, num_steps)
        rounds.append((current, renoised, following))
        current = following
    return rounds


def _path_schedule(num_steps: int, start_level=None, forward_interval=None,
                  backward_interval=None) -> tuple[int, list[tuple[int, int, int]]]:
    """Checked options of search over paths on an N-step schedule, defaults filled in.

    Returns:
        ``(start_level, rounds)`` with one ``(state, re-noised state, next state)`` per round.
    """
    if num_steps < 2:
        raise ValueError(f"search over paths needs a schedule of at least 2 steps, got num_steps={num_steps}")
    start = num_steps // 2 if start_level is None else start_level
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < num_steps:
        raise ValueError(f"start_level must be an int in [1, num_steps - 1 = {num_steps - 1}], got {start!r}")
    forward = max(1, num_steps // 10) if forward_interval is None else _positive_int("forward_interval",
                                                                                       forward_interval)
    backward = 2 * forward if backward_interval is None else _positive_int("backward_interval", backward_interval)
    if backward <= forward:
        raise ValueError(f"backward_interval ({backward}) must exceed forward_interval ({forward}), or the paths "
                         "never reach the end")
    return start, _path_rounds(num_steps, start, forward, backward)


def paths_search(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_paths: int | None = None,
                 branches: int = 4, start_level: int | None = None, forward_interval: int | None = None,
                 backward_interval: int | None = None, budget_nfe: int | None = None, num_prompts: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, device=None,
                 dtype: torch.dtype = torch.float32, progress: bool = True, **cond) -> SearchResult:
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
        :class:`SearchResult`; ``scores`` [P, n * M] the last round's scores; ``history`` per round ``{"round",
        "state" (where the branches ended), "nfe", "best_score": [P], "scores": [P, n * M]}``.
    """
    def body(search: _Search) -> SearchResult:
        steps = sampler.num_steps
        width = _positive_int("branches", branches)
        start, rounds = _path_schedule(steps, start_level, forward_interval, backward_interval)
        per_path = sampler.nfe(0, start) + width * sum(sampler.nfe(renoised, following)
                                                       for _, renoised, following in rounds)
        paths = _count("num_paths", num_paths, budget_nfe, per_path, "path")
        search.start(paths * per_path)
        num_prompts = search.num_prompts
        out = search.denoise(search.noise(paths, _NOISE), search.prompt_rows(paths), 0, start, _STEPS, 0)
        x = out.sample
        branch_prompts = search.prompt_rows(paths * width)
        history = []
        for round_index, (current, renoised, following) in enumerate(rounds):
            branched = sampler.renoise(x.repeat_interleave(width, dim=0), current, renoised,
                                       seed=derive_seed(search.seed, _RENOISE, round_index))
            out = search.denoise(branched, branch_prompts, renoised, following, _STEPS, round_index + 1)
            scored = out.sample if following == steps else out.pred_original_sample
            scores = search.score(scored, branch_prompts).view(num_prompts, paths * width)
            top_scores, local = fastsearch.segmented_topk(_selectable(scores), paths)
            keep = local + torch.arange(num_prompts, device=local.device)[:, None] * (paths * width)
            x = out.sample[keep.flatten()]
            best_score = scores.flatten()[keep[:, 0]]
            history.append({"round": round_index, "state": following, "nfe": search.nfe, "best_score": best_score,
                            "scores": scores})
        best_sample = x.view(num_prompts, paths, *search.shape)[:, 0]
        return search.result(best_sample, best_score, scores, history)

    return _run_search(body, "paths_search", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress)


class _ParticleWeights:
    """FK steering's potentials and log-weights for P prompts x n particles (prompt-major rows), with their
    ESS-triggered resampling: the bookkeeping of :func:`fk_steering`, shared with ``search_pipeline``.

    Each :meth:`update` takes the scores of a scoring step and returns that step's history entry; after an
    intermediate one, :meth:`resample` resamples the prompts whose effective sample size fell below
    ``ess_threshold * n`` and returns the flat ancestor of every row, by which the caller reorders its particles.
    """

    @staticmethod
    def check_options(potential: str, lam: float, ess_threshold: float) -> None:
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {list(POTENTIALS)}, got {potential!r}")
        if not float(lam) >= 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        if not 0.0 <= float(ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")

    def __init__(self, num_prompts: int, particles: int, potential: str, lam: float, ess_threshold: float,
                 device: torch.device):
        self.check_options(potential, lam, ess_threshold)
        self.num_prompts, self.particles = num_prompts, particles
        self.potential, self.lam, self.ess_threshold = potential, float(lam), float(ess_threshold)
        rows = num_prompts * particles
        # the potential's running statistic of each path, the log-weights, and the log of the product of the
        # potentials applied so far (which the final potential divides out)
        self.statistic = torch.full((rows,), -math.inf if potential == "max" else 0.0, device=device)
        self.log_weights = torch.zeros(rows, device=device)
        self.log_potential_total = torch.zeros(rows, device=device)
        self.identity = torch.arange(rows, device=device).view(num_prompts, particles)

    def update(self, scores: torch.Tensor, *, step: int, nfe: int, final: bool) -> dict:
        """Apply the potentials of [P * n] ``scores`` (the final samples' when ``final``); returns the history
        entry ``{"step", "nfe", "scores", "log_weights", "ess": None, "resampled", "ancestors": None,
        "best_score"}``."""
        reward = _selectable(scores)
        lam = self.lam
        if final:
            increment = lam * reward - self.log_potential_total
        elif self.potential == "max":
            self.statistic = torch.maximum(self.statistic, reward)
            increment = lam * self.statistic
        elif self.potential == "add":
            self.statistic = self.statistic + reward
            increment = lam * self.statistic
        elif self.potential == "diff":
            increment = lam * (reward - self.statistic)
            self.statistic = reward
        else:
            increment = lam * reward
        increment = _selectable(increment)  # lam = 0 times -inf, or -inf - -inf, count as impossible
        self.log_weights = _selectable(self.log_weights + increment)
        self.log_potential_total = self.log_potential_total + increment
        grouped_scores = scores.view(self.num_prompts, self.particles)
        return {"step": step, "nfe": nfe, "scores": grouped_scores,
                "log_weights": self.log_weights.view(self.num_prompts, self.particles).clone(), "ess": None,
                "resampled": torch.zeros(self.num_prompts, dtype=torch.bool, device=scores.device),
                "ancestors": None, "best_score": grouped_scores.flatten()[_best(grouped_scores)]}

    def resample(self, entry: dict, *, seed: int) -> torch.Tensor | None:
        """Resample (systematic) the prompts whose ESS is low, after an intermediate :meth:`update` whose
        ``entry`` gets ``"ess"``, ``"resampled"`` and ``"ancestors"``. Returns the [P * n] flat ancestor of every
        row, or None when no prompt resamples; resampled prompts restart their log-weights at 0."""
        grouped = self.log_weights.view(self.num_prompts, self.particles)
        ess = fastsearch.effective_sample_size(grouped)
        alive = torch.isfinite(grouped).any(dim=1)
        resampled = (ess < self.ess_threshold * self.particles) & alive
        entry["ess"], entry["resampled"] = ess, resampled
        if not bool(resampled.any()):
            return None
        drawn = fastsearch.resample(torch.where(alive[:, None], grouped, torch.zeros_like(grouped)), self.particles,
                                    method="systematic", seed=seed)
        ancestors = torch.where(resampled[:, None], drawn, self.identity)
        entry["ancestors"] = ancestors
        flat = ancestors.flatten()
        self.statistic = self.statistic[flat]
        self.log_potential_total = self.log_potential_total[flat]
        self.log_weights = torch.where(resampled.repeat_interleave(self.particles), 0.0, self.log_weights[flat])
        return flat


def fk_steering(model: Callable, verifier: Callable, sampler: Sampler, shape, *, num_particles: int | None = None,
                potential: str = "max", lam: float = 1.0, resample_every: int | None = None,
                ess_threshold: float = 0.5, budget_nfe: int | None = None, num_prompts: int | None = None,
                batch_size: int | None = None, seed: int | None = None, device=None,
                dtype: torch.dtype = torch.float32, progress: bool = True, **cond) -> SearchResult:
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
    best verifier score.

    Args:
        sampler: must be stochastic: ``DDIMSampler(..., eta>0)`` or ``FlowSampler(..., stochastic=True)``.
        num_particles: n >= 1 per prompt; or give ``budget_nfe`` (n = budget // NFEs per sample).
        potential: ``"max"``, ``"add"``, ``"diff"`` or ``"r_t"``.
        lam: lambda >= 0, the potentials' inverse temperature.
        resample_every: k >= 1 steps between scoring / resampling points (default max(1, N // 10)).
        ess_threshold: in [0, 1]; 0 never resamples, 1 resamples unless the weights are exactly uniform.
        Others: as :func:`random_search`.

    Returns:
        :class:`SearchResult`; ``scores`` [P, n] the final particles' scores; ``history`` per scoring step
        ``{"step", "nfe", "scores": [P, n], "log_weights": [P, n] (after this step's potential, before any
        resampling), "ess": [P], "resampled": [P] bool, "ancestors": [P, n] flat particle indices or None,
        "best_score": [P]}`` (the final entry has no ess / resampling: ``"ess"`` and ``"ancestors"`` are None and
        ``"resampled"`` all False).
    """
    def body(search: _Search) -> SearchResult:
        if not sampler.stochastic:
            raise ValueError(f"fk_steering needs a stochastic sampler (DDIMSampler with eta > 0, or FlowSampler with "
                             f"stochastic=True); sampler is {sampler!r}")
        _ParticleWeights.check_options(potential, lam, ess_threshold)
        steps = sampler.num_steps
        every = max(1, steps // 10) if resample_every is None else _positive_int("resample_every", resample_every)
        per_sample = sampler.nfe()
        particles = _count("num_particles", num_particles, budget_nfe, per_sample, "sample")
        search.start(particles * per_sample)
        num_prompts = search.num_prompts
        prompts = search.prompt_rows(particles)
        weights = _ParticleWeights(num_prompts, particles, potential, lam, ess_threshold, search.device)
        x = search.noise(particles, _NOISE)
        history = []
        for step in range(steps):
            out = search.denoise(x, prompts, step, step + 1, _STEPS, step)
            x = out.sample
            final = step == steps - 1
            if not final and (step + 1) % every:
                continue
            scores = search.score(x if final else out.pred_original_sample, prompts)
            entry = weights.update(scores, step=step, nfe=search.nfe, final=final)
            if not final:
                ancestors = weights.resample(entry, seed=derive_seed(search.seed, _RESAMPLE, step))
                if ancestors is not None:
                    x = x[ancestors]
            history.append(entry)
        final_scores = scores.view(num_prompts, particles)
        best = _best(final_scores)
        return search.result(x[best], final_scores.flatten()[best], final_scores, history)

    return _run_search(body, "fk_steering", model, verifier, sampler, shape, cond, num_prompts=num_prompts,
                       batch_size=batch_size, seed=seed, device=device, dtype=dtype, progress=progress)
