"""The noise searches with ``group=``: on 2 and 3 gloo ranks they return exactly what one process returns.

Each rank runs the search alone (``group=None``) and sharded over the group, then compares every field of the
two results, history included, bit for bit. The ranks are the pool of :mod:`test_distributed`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import ranks  # noqa: F401 - the module's rank pool fixture

import fastsearch.distributed as fd
from fastsearch.diffusion import DDIMSampler, FlowSampler, fk_steering, paths_search, random_search, zero_order_search
from fastsearch.models import gmm

MIXTURE = gmm.rare_mode_mixture(2)
VERIFIER = gmm.ModeLogDensity(MIXTURE)
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


def _same(got, want, what: str) -> None:
    """Equal results: tensors bit for bit (NaN where NaN), containers field by field."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, \
            f"{what}: {got!r} vs {want!r}"
        assert torch.equal(torch.nan_to_num(got, nan=123.0), torch.nan_to_num(want, nan=123.0)) and \
            torch.equal(torch.isnan(got), torch.isnan(want)) if got.is_floating_point() else torch.equal(got, want), \
            f"{what}:\n{got}\n!=\n{want}"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _same(got[key], want[key], f"{what}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{what}: {len(got)} entries != {len(want)}"
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            _same(a, b, f"{what}[{index}]")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def _compare(search, what: str, **kwargs) -> None:
    alone = search(**kwargs)
    sharded = search(**kwargs, group=dist.group.WORLD)
    for field in ("sample", "score", "scores", "nfe", "total_nfe", "verifier_calls", "history", "noise"):
        _same(getattr(sharded, field), getattr(alone, field), f"{what}.{field}")


def _vp(steps: int, eta: float = 0.0) -> tuple:
    return MIXTURE.vp_model(ALPHAS_CUMPROD), DDIMSampler(ALPHAS_CUMPROD, steps, eta=eta)


def _searches(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    common = {"verifier": VERIFIER, "shape": (2,), "progress": False}
    model, sampler = _vp(4, eta=1.0)
    _compare(random_search, "random", model=model, sampler=sampler, num_candidates=5, num_prompts=3, seed=3,
             **common)
    _compare(random_search, "random flow", model=MIXTURE.flow_model(), sampler=FlowSampler(3, stochastic=True),
             num_candidates=4, num_prompts=1, seed=4, batch_size=2, **common)
    for potential, lam in (("max", 4.0), ("diff", 2.0)):
        _compare(fk_steering, f"fk {potential}", model=model, sampler=DDIMSampler(ALPHAS_CUMPROD, 6, eta=1.0),
                 num_particles=7, num_prompts=2, resample_every=2, ess_threshold=0.9, potential=potential, lam=lam,
                 seed=5, **common)
    result = fk_steering(model, VERIFIER, DDIMSampler(ALPHAS_CUMPROD, 6, eta=1.0), (2,), num_particles=7,
                         num_prompts=2, resample_every=2, ess_threshold=0.9, lam=4.0, seed=5, progress=False,
                         group=dist.group.WORLD)
    assert any(bool(entry["resampled"].any()) for entry in result.history), "no step resampled: nothing exchanged"
    _compare(zero_order_search, "zero-order", model=model, sampler=sampler, num_neighbors=3, iterations=3,
             num_prompts=2, seed=6, **common)
    _compare(paths_search, "paths", model=model, sampler=DDIMSampler(ALPHAS_CUMPROD, 8, eta=0.5), num_paths=3,
             branches=2, num_prompts=2, seed=7, **common)


@pytest.mark.parametrize("world_size", [2, 3])
def test_diffusion_searches_equal_one_process(ranks, world_size):  # noqa: F811
    ranks(world_size).run(_searches)


def _search_faults(rank: int, world_size: int) -> None:
    model, sampler = _vp(3, eta=1.0)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="disagree on .*options"):
        fk_steering(model, VERIFIER, sampler, (2,), num_particles=4 + rank, seed=1, progress=False, group=group)
    with pytest.raises(ValueError, match="disagree on seed"):
        random_search(model, VERIFIER, sampler, (2,), num_candidates=4, seed=rank, progress=False, group=group)
    with pytest.raises(ValueError, match="needs a seed"):
        random_search(model, VERIFIER, sampler, (2,), num_candidates=4, progress=False, group=group)

    def verifier(x0):
        if rank == 1:
            raise RuntimeError("out of memory in the reward model")
        return VERIFIER(x0)

    with pytest.raises(fd.RankFailed, match=r"rank\(s\) \[1\]"):
        fk_steering(model, verifier, sampler, (2,), num_particles=5, seed=1, progress=False, group=group)
    # the group is still usable afterwards
    fk_steering(model, VERIFIER, sampler, (2,), num_particles=5, seed=1, progress=False, group=group)


def test_search_faults_raise_on_every_rank(ranks):  # noqa: F811
    ranks(2).run(_search_faults)


# -- the LLM searches: problems split over the ranks ------------------------------------------------------------


def _same_search_result(got, want, what: str) -> None:
    for field in ("completions", "answers", "chosen", "candidates", "candidate_answers", "scores", "offsets",
                  "strategy"):
        _same(getattr(got, field), getattr(want, field), f"{what}.{field}")
    for field in ("generated_tokens", "tokens_per_problem", "sequences", "scored_steps", "scored_completions"):
        _same(getattr(got.spent, field), getattr(want.spent, field), f"{what}.spent.{field}")


def _llm_searches(rank: int, world_size: int) -> None:
    from fastsearch.models import reasoning
    from fastsearch.search import beam_search, best_of_n, dvts, particle_filter

    problems = [p.text for p in reasoning.make_problems(5, seed=3)]
    group = dist.group.WORLD
    cases = {
        "best_of_n": lambda **kw: best_of_n(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=6,
                                            vote="weighted", answer_fn=reasoning.extract_answer, seed=2, **kw),
        "beam_search": lambda **kw: beam_search(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(),
                                                n=4, beam_width=2, max_steps=6, seed=2, **kw),
        "dvts": lambda **kw: dvts(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=4,
                                  beam_width=2, max_steps=6, seed=2, **kw),
    }
    for name, search in cases.items():
        alone, sharded = search(), search(group=group)
        _same_search_result(sharded, alone, name)
        assert sharded.spent.generator_calls >= alone.spent.generator_calls
    # particle filtering: a valid search over every problem, the same result on every rank
    result = particle_filter(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=4, max_steps=6,
                             seed=2, group=group)
    assert len(result.completions) == len(problems) and result.offsets.tolist() == list(range(0, 21, 4))
    everyone = [None] * world_size
    dist.all_gather_object(everyone, (result.completions, result.scores.tolist()))
    assert all(part == everyone[0] for part in everyone)
    with pytest.raises(ValueError, match="disagree on n"):
        best_of_n(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=4 + rank, seed=1, group=group)

    class Failing(reasoning.SimulatedPRM):
        def score(self, problems, step_lists):
            if rank == 0:
                raise RuntimeError("the PRM server is down")
            return super().score(problems, step_lists)

    with pytest.raises(fd.RankFailed, match=r"rank\(s\) \[0\].*PRM server is down"):
        best_of_n(problems, reasoning.SimulatedGenerator(), Failing(), n=4, seed=1, group=group)


@pytest.mark.parametrize("world_size", [2, 3])
def test_llm_searches_split_problems_over_ranks(ranks, world_size):  # noqa: F811
    ranks(world_size).run(_llm_searches)
