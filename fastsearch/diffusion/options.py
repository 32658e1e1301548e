"""What each noise search is asked to do: one small frozen dataclass per algorithm, checked when it is built.

The tensor-level searches (:func:`~fastsearch.diffusion.random_search`, ...) build these from their keywords;
:func:`fastsearch.integrations.diffusers.search_pipeline` takes them directly (or a name, for the defaults). A
bad value raises when the object is built: a TypeError when its type is wrong, a ValueError when its value is,
naming the argument. Checks that need the schedule (``start_level`` against the number of steps) run when the
search is planned on it.

Each search has a *count* (candidates, rounds, paths or particles; ``count_name`` says which field): given
directly, or None and then derived from the search's ``budget_nfe`` as the most that budget pays for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastsearch.checks import check_float, check_int, check_optional_int
from fastsearch.diffusion.path_plan import PathPlan

POTENTIALS = ("max", "add", "diff", "r_t")


def _store(options, name: str, value) -> None:
    """Write a checked (converted) value into a frozen dataclass, from its ``__post_init__``."""
    object.__setattr__(options, name, value)


@dataclass(frozen=True)
class RandomSearch:
    """Random search: best-of-N over initial noises (Ma et al. 2025).

    Attributes:
        num_candidates: N >= 1 samples per prompt; None: as many as ``budget_nfe`` pays for.
    """

    num_candidates: int | None = None

    name: ClassVar[str] = "random"
    count_name: ClassVar[str] = "num_candidates"

    def __post_init__(self):
        _store(self, "num_candidates", check_optional_int("num_candidates", self.num_candidates))


@dataclass(frozen=True)
class ZeroOrderSearch:
    """Zero-order search: move a pivot noise to its best neighbour (Ma et al. 2025).

    Attributes:
        num_neighbors: K >= 1 neighbours of the pivot per round.
        cos_sim: the neighbours' cosine similarity with the pivot, in [-1, 1] (their norm is the pivot's).
        iterations: rounds >= 1, each of K + 1 samples; None: as many as ``budget_nfe`` pays for.
    """

    num_neighbors: int = 4
    cos_sim: float = 0.95
    iterations: int | None = None

    name: ClassVar[str] = "zero_order"
    count_name: ClassVar[str] = "iterations"

    def __post_init__(self):
        _store(self, "num_neighbors", check_int("num_neighbors", self.num_neighbors))
        _store(self, "cos_sim", check_float("cos_sim", self.cos_sim, low=-1.0, high=1.0))
        _store(self, "iterations", check_optional_int("iterations", self.iterations))

    @property
    def width(self) -> int:
        """Samples per round: the pivot and its K neighbours."""
        return self.num_neighbors + 1


def _check_interval_order(forward: int, backward: int) -> None:
    if backward <= forward:
        raise ValueError(f"backward_interval ({backward}) must exceed forward_interval ({forward}), or the paths "
                         "never reach the end")


@dataclass(frozen=True)
class PathsSearch:
    """Search over paths: re-noise kept paths and denoise them again in branches (Ma et al. 2025).

    States are step indices of the schedule (0 = pure noise, N = clean).

    Attributes:
        num_paths: n >= 1 kept paths per prompt; None: as many as ``budget_nfe`` pays for.
        branches: M >= 1 re-noised branches per path per round.
        start_level: the state where branching starts, in [1, N - 1] (None: N // 2).
        forward_interval: steps re-noised forward per round, >= 1 (None: max(1, N // 10)).
        backward_interval: steps denoised per round, > forward_interval (None: 2 * forward_interval).
    """

    num_paths: int | None = None
    branches: int = 4
    start_level: int | None = None
    forward_interval: int | None = None
    backward_interval: int | None = None

    name: ClassVar[str] = "paths"
    count_name: ClassVar[str] = "num_paths"

    def __post_init__(self):
        _store(self, "num_paths", check_optional_int("num_paths", self.num_paths))
        _store(self, "branches", check_int("branches", self.branches))
        _store(self, "start_level", check_optional_int("start_level", self.start_level))
        _store(self, "forward_interval", check_optional_int("forward_interval", self.forward_interval))
        _store(self, "backward_interval", check_optional_int("backward_interval", self.backward_interval))
        if self.forward_interval is not None and self.backward_interval is not None:
            _check_interval_order(self.forward_interval, self.backward_interval)

    def plan(self, num_steps: int) -> PathPlan:
        """The rounds on an N-step schedule, defaults filled in; a ValueError if they do not fit it."""
        if num_steps < 2:
            raise ValueError(f"search over paths needs a schedule of at least 2 steps, got num_steps={num_steps}")
        start = num_steps // 2 if self.start_level is None else self.start_level
        if not 1 <= start < num_steps:
            raise ValueError(f"start_level must be an int in [1, num_steps - 1 = {num_steps - 1}], got {start!r}")
        forward = max(1, num_steps // 10) if self.forward_interval is None else self.forward_interval
        backward = 2 * forward if self.backward_interval is None else self.backward_interval
        _check_interval_order(forward, backward)
        return PathPlan.build(num_steps, start, forward, backward)


@dataclass(frozen=True)
class FKSteering:
    """Feynman-Kac steering: sequential Monte Carlo over particles with verifier potentials (Singhal et al. 2025).

    Attributes:
        num_particles: n >= 1 particles per prompt; None: as many as ``budget_nfe`` pays for.
        potential: ``"max"``, ``"add"``, ``"diff"`` or ``"r_t"`` (see :func:`~fastsearch.diffusion.fk_steering`).
        lam: lambda >= 0, the potentials' inverse temperature.
        resample_every: k >= 1 steps between scoring / resampling points (None: max(1, N // 10)).
        ess_threshold: in [0, 1]; 0 never resamples, 1 resamples unless the weights are exactly uniform.
        eta: > 0, the DDIM stochasticity of the steps when steering a pipeline with a DDIM scheduler (the
            tensor-level :func:`~fastsearch.diffusion.fk_steering` takes its steps from its sampler instead).
    """

    num_particles: int | None = None
    potential: str = "max"
    lam: float = 1.0
    resample_every: int | None = None
    ess_threshold: float = 0.5
    eta: float = 1.0

    name: ClassVar[str] = "fk"
    count_name: ClassVar[str] = "num_particles"

    def __post_init__(self):
        _store(self, "num_particles", check_optional_int("num_particles", self.num_particles))
        if not isinstance(self.potential, str):
            raise TypeError(f"potential must be a str, got {type(self.potential).__name__}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {list(POTENTIALS)}, got {self.potential!r}")
        _store(self, "lam", check_float("lam", self.lam, low=0.0))
        _store(self, "resample_every", check_optional_int("resample_every", self.resample_every))
        _store(self, "ess_threshold", check_float("ess_threshold", self.ess_threshold, low=0.0, high=1.0))
        _store(self, "eta", check_float("eta", self.eta, low=0.0, low_open=True))

    def scores_after(self, step: int, num_steps: int) -> bool:
        """Whether the verifier scores the particles after ``step`` of N: every ``resample_every``-th step (steps
        ``k - 1, 2k - 1, ...``) and the last."""
        every = max(1, num_steps // 10) if self.resample_every is None else self.resample_every
        return step == num_steps - 1 or (step + 1) % every == 0


SearchOptions = RandomSearch | ZeroOrderSearch | PathsSearch | FKSteering
SEARCHES = {options.name: options for options in (RandomSearch, ZeroOrderSearch, PathsSearch, FKSteering)}


def search_options(search: SearchOptions | str) -> SearchOptions:
    """``search`` as an options object: itself, or the defaults of the algorithm it names."""
    if isinstance(search, str):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {list(SEARCHES)} or an options object, got {search!r}")
        return SEARCHES[search]()
    if not isinstance(search, SearchOptions):
        raise TypeError(f"search must be a RandomSearch, ZeroOrderSearch, PathsSearch or FKSteering (or one of "
                        f"{list(SEARCHES)}), got {type(search).__name__}")
    return search
