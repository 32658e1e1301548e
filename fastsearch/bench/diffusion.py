"""Search overhead per NFE: the time a search spends outside the model and the verifier, per model evaluation.

Each case runs one search on the analytic Gaussian mixture (d = 64) with 256 model rows per step, the model and
the verifier wrapped in timers (CUDA is synchronised around every call so that time queued before a call is
charged to the search). Overhead per NFE = (wall time - model time - verifier time) / NFEs spent over all
prompts. ``rows`` returns one row per search for ``fastsearch bench`` and its CSV.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fastsearch.diffusion import (
    FlowSampler,
    NoiseSearchResult,
    fk_steering,
    paths_search,
    random_search,
    zero_order_search,
)
from fastsearch.models import gmm

DIM = 64
ROWS = 256
NUM_STEPS = 10


class _Timed:
    """A callable that adds the wall time spent inside it to ``seconds``."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn = fn
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        self.sync()
        begin = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - begin
        return out


def cases(device="cpu") -> dict[str, Callable[[Callable, Callable], NoiseSearchResult]]:
    """The benchmarked searches, each with 256 model rows per step.

    Returns:
        name -> ``run(model, verifier)``, to call with the model and verifier of :func:`problem`.
    """
    device = torch.device(device)
    flow = FlowSampler(NUM_STEPS)
    stochastic = FlowSampler(NUM_STEPS, stochastic=True)
    common = {"num_prompts": 1, "seed": 0, "device": device, "progress": False}
    return {
        "random_search": lambda model, verifier: random_search(model, verifier, flow, (DIM,), num_candidates=ROWS,
                                                               **common),
        "zero_order_search": lambda model, verifier: zero_order_search(
            model, verifier, flow, (DIM,), num_neighbors=ROWS - 1, iterations=2, **common),
        "paths_search": lambda model, verifier: paths_search(
            model, verifier, flow, (DIM,), num_paths=ROWS // 4, branches=4, start_level=4, forward_interval=1,
            backward_interval=2, **common),
        "fk_steering": lambda model, verifier: fk_steering(model, verifier, stochastic, (DIM,), num_particles=ROWS,
                                                           resample_every=1, **common),
    }


def problem(device="cpu") -> tuple[Callable, Callable]:
    """The d = 64 rare-mode mixture's exact flow model and the rare mode's log-density verifier, on ``device``."""
    mixture = gmm.rare_mode_mixture(DIM, device=torch.device(device))
    return mixture.flow_model(), gmm.ModeLogDensity(mixture)


def overhead_per_nfe(run: Callable[[Callable, Callable], NoiseSearchResult], device="cpu") -> float:
    """Seconds per NFE that one call of ``run`` spends outside the model and the verifier."""
    device = torch.device(device)
    model, verifier = problem(device)
    timed_model, timed_verifier = _Timed(model, device), _Timed(verifier, device)
    timed_model.sync()
    begin = time.perf_counter()
    result = run(timed_model, timed_verifier)
    timed_model.sync()
    wall = time.perf_counter() - begin
    return (wall - timed_model.seconds - timed_verifier.seconds) / result.total_nfe


def rows(min_run_time: float = 0.5, device="cpu") -> list[dict]:
    """One row per search: the median overhead per NFE over repeated runs (at least 3, ``min_run_time`` s).

    Returns:
        dicts with keys ``op``, ``case``, ``shape``, ``dtype``, ``impl`` and ``median_us`` (microseconds per NFE).
    """
    out = []
    for name, run in cases(device).items():
        overhead_per_nfe(run, device)  # warm up: caches, first-call dispatch
        measured, begin = [], time.perf_counter()
        while len(measured) < 3 or time.perf_counter() - begin < min_run_time:
            measured.append(overhead_per_nfe(run, device))
        out.append({"op": name, "case": f"gmm d={DIM} B={ROWS} overhead_per_nfe", "shape": f"{ROWS}x{DIM}",
                    "dtype": "float32", "impl": "fastsearch", "median_us": round(statistics.median(measured) * 1e6, 3)})
    return out


class _CollectiveTimer:
    """Adds the wall time spent inside torch.distributed's collectives to ``seconds`` while it is entered (time
    waiting for the slowest rank included: that is what a step loses to the group)."""

    NAMES = ("all_gather", "all_reduce", "all_to_all_single", "broadcast")

    def __init__(self):
        self.seconds, self.calls, self._saved = 0.0, 0, {}

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - begin
                self.calls += 1
        return timed

    def __enter__(self) -> _CollectiveTimer:
        import torch.distributed as dist

        for name in self.NAMES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(self._saved[name]))
        return self

    def __exit__(self, *exc_info) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def fk_communication_share(group, particles: int = ROWS, repeats: int = 3, dim: int = DIM) -> dict:
    """FK steering (the rare-mode mixture in ``dim`` dimensions, ``particles`` particles, 10 stochastic flow steps,
    scoring and ESS-triggered resampling after every step) over ``group``: the median wall time of a run and the
    share of it this rank spends inside collectives (score gathering with the fault flag, argument agreement,
    particle exchange, the winner).

    Call it on every rank of ``group``. Returns ``{"particles", "dim", "steps", "wall_s", "comm_s", "comm_share",
    "collectives", "resampled_steps"}`` for this rank.
    """
    mixture = gmm.rare_mode_mixture(dim)
    model, verifier = mixture.flow_model(), gmm.ModeLogDensity(mixture)
    sampler = FlowSampler(NUM_STEPS, stochastic=True)
    walls, comms = [], []
    for _ in range(repeats + 1):  # the first run warms up
        with _CollectiveTimer() as timer:
            begin = time.perf_counter()
            result = fk_steering(model, verifier, sampler, (dim,), num_particles=particles, resample_every=1,
                                 num_prompts=1, seed=0, progress=False, group=group)
            walls.append(time.perf_counter() - begin)
            comms.append(timer.seconds)
    wall, comm = statistics.median(walls[1:]), statistics.median(comms[1:])
    return {"particles": particles, "dim": dim, "steps": NUM_STEPS, "wall_s": wall, "comm_s": comm,
            "comm_share": comm / wall, "collectives": timer.calls,
            "resampled_steps": sum(bool(entry["resampled"].any()) for entry in result.history)}
