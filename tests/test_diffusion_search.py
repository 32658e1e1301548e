"""Noise search on the Gaussian mixture: exact NFE accounting, search helps, the semantics of each algorithm
(zero-order neighbours, re-noising marginals, FK weights and resampling), determinism and bad input."""

import math

import pytest
import torch

import fastsearch
from fastsearch.diffusion import (
    DDIMSampler,
    FlowSampler,
    NoiseSearchResult,
    fk_steering,
    no_search,
    paths_search,
    random_search,
    zero_order_search,
)
from fastsearch.models import gmm

MIXTURE = gmm.rare_mode_mixture(2)
VERIFIER = gmm.ModeLogDensity(MIXTURE)  # log-density of the rare mode
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


# small tensors: on a loaded machine intra-op threads only add wake-up latency (seconds per test)
pytestmark = pytest.mark.usefixtures("one_thread")


class Counting:
    """Counts the rows a callable evaluates."""

    def __init__(self, fn):
        self.fn = fn
        self.rows = 0

    def __call__(self, *args, **kwargs):
        self.rows += args[0].shape[0]
        return self.fn(*args, **kwargs)


def _model_for(sampler):
    return MIXTURE.flow_model() if isinstance(sampler, FlowSampler) else MIXTURE.vp_model(ALPHAS_CUMPROD)


def _path_cost(sampler, start, forward, backward, branches):
    """NFEs of one path of search over paths, written out independently of the implementation."""
    cost = sampler.nfe(0, start)
    state = start
    while state < sampler.num_steps:
        low = max(state - forward, 0)
        high = min(low + backward, sampler.num_steps)
        cost += branches * sampler.nfe(low, high)
        state = high
    return cost


SAMPLERS = {
    "euler": lambda: FlowSampler(8),
    "heun": lambda: FlowSampler(6, solver="heun"),
    "ddim": lambda: DDIMSampler(ALPHAS_CUMPROD, 8),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("budget", [37, 200])
def test_nfe_accounting_is_exact(name, budget):
    sampler = SAMPLERS[name]()
    per_sample = sampler.nfe()
    prompts = 3
    cases = {
        "random": (random_search, {}, (budget // per_sample) * per_sample),
        "zero_order": (zero_order_search, {"num_neighbors": 2}, (budget // (3 * per_sample)) * 3 * per_sample),
        "paths": (paths_search, {"branches": 2, "start_level": 2, "forward_interval": 1, "backward_interval": 3},
                  (budget // _path_cost(sampler, 2, 1, 3, 2)) * _path_cost(sampler, 2, 1, 3, 2)),
    }
    for search, options, expected in cases.values():
        model = Counting(_model_for(sampler))
        verifier = Counting(VERIFIER)
        result = search(model, verifier, sampler, (2,), budget_nfe=budget, num_prompts=prompts, seed=0,
                        progress=False, **options)
        assert result.nfe == expected <= budget
        assert result.total_nfe == model.rows == prompts * expected
        assert result.verifier_calls == verifier.rows
        assert result.history[-1]["nfe"] == expected
    if name != "heun":
        stochastic = FlowSampler(8, stochastic=True) if name == "euler" else DDIMSampler(ALPHAS_CUMPROD, 8, eta=1.0)
        model, verifier = Counting(_model_for(stochastic)), Counting(VERIFIER)
        result = fk_steering(model, verifier, stochastic, (2,), budget_nfe=budget, num_prompts=prompts,
                             resample_every=3, seed=0, progress=False)
        particles = budget // 8
        assert result.nfe == particles * 8 and result.total_nfe == model.rows == prompts * particles * 8
        assert result.verifier_calls == verifier.rows == prompts * particles * 3  # after steps 2, 5 and 7


def test_counts_given_directly():
    sampler = FlowSampler(8)
    result = random_search(_model_for(sampler), VERIFIER, sampler, (2,), num_candidates=5, num_prompts=2, seed=0,
                           progress=False)
    assert result.nfe == 40 and result.scores.shape == (2, 5) and result.sample.shape == (2, 2)
    assert isinstance(result, NoiseSearchResult)
    assert repr(result) == ("NoiseSearchResult(sample=[2, 2], scores=[2, 5], nfe=40, total_nfe=80, verifier_calls=10, "
                            "history=1 entries)")
    result = zero_order_search(_model_for(sampler), VERIFIER, sampler, (2,), num_neighbors=3, iterations=4, seed=0,
                               progress=False)
    assert result.nfe == 4 * 4 * 8 and result.scores.shape == (1, 16) and len(result.history) == 4
    result = paths_search(_model_for(sampler), VERIFIER, sampler, (2,), num_paths=3, branches=2, start_level=4,
                          forward_interval=2, backward_interval=4, seed=0, progress=False)
    assert result.nfe == 3 * _path_cost(sampler, 4, 2, 4, 2) and result.scores.shape == (1, 6)
    assert [entry["state"] for entry in result.history] == [6, 8]


def test_random_search_improves_with_more_candidates():
    """Best-of-N of the rare mode's log-density, averaged over 24 prompts x 2 seeds, grows with N."""
    sampler = FlowSampler(6)
    means = []
    for count in (1, 4, 16, 64):
        scores = [random_search(_model_for(sampler), VERIFIER, sampler, (2,), num_candidates=count, num_prompts=24,
                                seed=seed, progress=False).score.mean().item() for seed in (1, 2)]
        means.append(sum(scores) / 2)
    assert all(a < b for a, b in zip(means[:-1], means[1:], strict=False)), means


def test_every_search_beats_no_search_at_equal_nfe():
    """No search spends the same NFEs on more denoising steps of one sample (Ma et al.'s baseline)."""
    budget, prompts = 96, 24
    flow = FlowSampler(6)
    model = _model_for(flow)
    baseline = no_search(model, VERIFIER, FlowSampler(budget), (2,), num_prompts=prompts, seed=0, progress=False)
    assert baseline.nfe == budget
    results = {
        "random": random_search(model, VERIFIER, flow, (2,), budget_nfe=budget, num_prompts=prompts, seed=0,
                                progress=False),
        "zero_order": zero_order_search(model, VERIFIER, flow, (2,), budget_nfe=budget, num_neighbors=3,
                                        num_prompts=prompts, seed=0, progress=False),
        "paths": paths_search(model, VERIFIER, flow, (2,), budget_nfe=budget, num_prompts=prompts, branches=2,
                              start_level=2, forward_interval=1, backward_interval=2, seed=0, progress=False),
        "fk": fk_steering(model, VERIFIER, FlowSampler(6, stochastic=True), (2,), budget_nfe=budget,
                          num_prompts=prompts, lam=1.0, resample_every=1, seed=0, progress=False),
    }
    for name, result in results.items():
        assert result.nfe <= budget
        assert result.score.mean() > baseline.score.mean() + 10, (name, result.score.mean(), baseline.score.mean())


def test_zero_order_neighbours_keep_norm_and_cosine_and_the_pivot_is_rescored():
    sampler = FlowSampler(6)
    cos_sim = 0.9
    flow = MIXTURE.flow_model()
    moved_any = restarted_any = False

    def model(x, sigma, **cond):  # samples of shape (2, 3): the mixture sees three 2-D points per sample
        return flow(x.transpose(1, 2).reshape(-1, 2), sigma.repeat_interleave(3)).view(-1, 3, 2).transpose(1, 2)

    def verifier(x0, component):
        return VERIFIER(x0.transpose(1, 2).reshape(-1, 2), component.repeat_interleave(3)).view(-1, 3).sum(1)

    result = zero_order_search(model, verifier, sampler, (2, 3), num_neighbors=3, iterations=6, cos_sim=cos_sim,
                               num_prompts=4, seed=3, progress=False, component=torch.zeros(4, dtype=torch.long))
    for before, after in zip(result.history[:-1], result.history[1:], strict=True):
        old, new = before["pivot"].flatten(1), after["pivot"].flatten(1)
        for p in range(4):
            if before["moved"][p]:
                moved_any = True
                torch.testing.assert_close(new[p].norm(), old[p].norm(), rtol=1e-5, atol=0)
                cosine = (new[p] @ old[p]) / (new[p].norm() * old[p].norm())
                torch.testing.assert_close(cosine, torch.tensor(cos_sim), rtol=0, atol=1e-5)
                # the new pivot is scored again next round and keeps the score it had as a neighbour
                round_index = before["round"]
                assert result.scores[p, 4 * (round_index + 1)] == before["round_best"][p]
            else:
                restarted_any = True
                assert before["restarted"][p]
                assert abs(torch.nn.functional.cosine_similarity(new[p], old[p], dim=0)) < 0.99
    assert moved_any and restarted_any
    best_so_far = torch.stack([entry["best_score"] for entry in result.history])
    assert (best_so_far[1:] >= best_so_far[:-1]).all()
    torch.testing.assert_close(result.score, result.scores.max(dim=1).values)


@pytest.mark.parametrize("schedule", ["flow", "vp"])
def test_renoising_has_the_forward_marginal(schedule):
    """x at state i of the forward process, re-noised to state j, is distributed as the forward process at j."""
    sampler = FlowSampler(10) if schedule == "flow" else DDIMSampler(ALPHAS_CUMPROD, 10)
    count, i, j = 40_000, 7, 3
    x0 = torch.tensor([1.5, -0.5, 0.25])
    level_i, level_j = float(sampler.noise_level(i)), float(sampler.noise_level(j))
    if schedule == "flow":
        scale_i, noise_i, scale_j, noise_j = 1 - level_i, level_i, 1 - level_j, level_j
    else:
        scale_i, noise_i = math.sqrt(level_i), math.sqrt(1 - level_i)
        scale_j, noise_j = math.sqrt(level_j), math.sqrt(1 - level_j)
    x_i = scale_i * x0 + noise_i * fastsearch.randn((count, 3), seed=1)
    x_j = sampler.renoise(x_i, i, j, seed=2)
    standard_error = noise_j / math.sqrt(count)
    torch.testing.assert_close(x_j.mean(0), scale_j * x0, atol=5 * standard_error, rtol=0)
    torch.testing.assert_close(x_j.var(0), torch.full((3,), noise_j**2), atol=5 * noise_j**2 * math.sqrt(2 / count),
                               rtol=0)


def _fk(potential, ess_threshold, resample_every=2, lam=0.5, seed=0, sampler=None, prompts=3, particles=6):
    sampler = sampler or FlowSampler(7, stochastic=True)
    return fk_steering(_model_for(sampler), VERIFIER, sampler, (2,), num_particles=particles, potential=potential,
                       lam=lam, resample_every=resample_every, ess_threshold=ess_threshold, num_prompts=prompts,
                       seed=seed, progress=False)


@pytest.mark.parametrize("potential", ["max", "add", "diff", "r_t"])
def test_fk_weights_without_resampling(potential):
    """With resampling off, the log-weights are the sums of the potentials, and the final one is lam * r(x0)."""
    lam = 0.5
    result = _fk(potential, ess_threshold=0.0, lam=lam)
    assert [entry["step"] for entry in result.history] == [1, 3, 5, 6]
    running_max = torch.full((3, 6), -math.inf)
    running_sum = torch.zeros(3, 6)
    previous = torch.zeros(3, 6)
    log_weight = torch.zeros(3, 6)
    for entry in result.history[:-1]:
        assert not entry["resampled"].any() and entry["ancestors"] is None
        r = entry["scores"]
        running_max, running_sum = torch.maximum(running_max, r), running_sum + r
        increment = {"max": running_max, "add": running_sum, "diff": r - previous, "r_t": r}[potential]
        previous = r
        log_weight = log_weight + lam * increment
        torch.testing.assert_close(entry["log_weights"], log_weight, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(entry["ess"], fastsearch.effective_sample_size(entry["log_weights"]))
    final = result.history[-1]
    torch.testing.assert_close(final["log_weights"], lam * result.scores, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(final["scores"], result.scores)


def test_fk_resampling_is_triggered_by_ess_at_the_chosen_steps():
    result = _fk("max", ess_threshold=0.8, resample_every=2, lam=0.05, particles=8, prompts=4)
    triggered_somewhere = skipped_somewhere = False
    for entry in result.history[:-1]:
        expected = entry["ess"] < 0.8 * 8
        assert torch.equal(entry["resampled"], expected)
        triggered_somewhere |= bool(expected.any())
        skipped_somewhere |= bool((~expected).any())
        if entry["ancestors"] is not None:
            identity = torch.arange(32).view(4, 8)
            kept = ~entry["resampled"]
            assert torch.equal(entry["ancestors"][kept], identity[kept])
            own_prompt = entry["ancestors"] // 8 == torch.arange(4)[:, None]
            assert own_prompt.all()
    assert triggered_somewhere and skipped_somewhere
    always = _fk("add", ess_threshold=1.0, resample_every=3)
    assert [entry["step"] for entry in always.history] == [2, 5, 6]
    assert all(entry["resampled"].all() for entry in always.history[:-1])
    assert not always.history[-1]["resampled"].any() and always.history[-1]["ess"] is None


def test_fk_resampling_concentrates_on_the_heaviest_particle_and_resets_weights():
    result = _fk("r_t", ess_threshold=1.0, resample_every=3, lam=1000.0)
    first, second = result.history[0], result.history[1]
    heaviest = first["log_weights"].argmax(dim=1) + torch.arange(3) * 6
    assert torch.equal(first["ancestors"], heaviest[:, None].expand(3, 6))
    # weights restart at 0 after resampling: the next log-weights are that step's potential alone
    torch.testing.assert_close(second["log_weights"], 1000.0 * second["scores"])


def test_fk_needs_a_stochastic_sampler():
    for sampler in (FlowSampler(5), DDIMSampler(ALPHAS_CUMPROD, 5), FlowSampler(5, solver="heun")):
        with pytest.raises(ValueError, match="stochastic sampler"):
            fk_steering(_model_for(sampler), VERIFIER, sampler, (2,), num_particles=4, progress=False)


SEARCHES = {
    "random": lambda sampler, **kw: random_search(_model_for(sampler), VERIFIER, sampler, (2,), num_candidates=5,
                                                  **kw),
    "zero_order": lambda sampler, **kw: zero_order_search(_model_for(sampler), VERIFIER, sampler, (2,),
                                                          num_neighbors=2, iterations=3, **kw),
    "paths": lambda sampler, **kw: paths_search(_model_for(sampler), VERIFIER, sampler, (2,), num_paths=3,
                                                branches=2, **kw),
    "fk": lambda sampler, **kw: fk_steering(_model_for(sampler), VERIFIER, sampler, (2,), num_particles=5,
                                            resample_every=2, **kw),
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_same_seed_same_result_for_any_batch_size(name):
    sampler = DDIMSampler(ALPHAS_CUMPROD, 8, eta=1.0) if name == "fk" else DDIMSampler(ALPHAS_CUMPROD, 8, eta=0.5)
    first = SEARCHES[name](sampler, seed=7, num_prompts=2, progress=False)
    again = SEARCHES[name](sampler, seed=7, num_prompts=2, progress=False, batch_size=3)
    other = SEARCHES[name](sampler, seed=8, num_prompts=2, progress=False)
    torch.testing.assert_close(first.sample, again.sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first.scores, again.scores, rtol=1e-5, atol=1e-5)
    assert first.nfe == again.nfe
    assert not torch.allclose(first.scores, other.scores)


def test_per_prompt_conditioning():
    """Two prompts ask the verifier for different modes; each prompt's best sample sits in its mode."""
    sampler = FlowSampler(8)
    component = torch.tensor([0, 3])
    result = random_search(_model_for(sampler), VERIFIER, sampler, (2,), num_candidates=64, seed=0, progress=False,
                           batch_size=20, component=component)
    assert result.sample.shape == (2, 2)
    nearest = torch.cdist(result.sample.double(), MIXTURE.means).argmin(dim=1)
    assert torch.equal(nearest, component)
    torch.testing.assert_close(result.score, VERIFIER(result.sample, component=component))
    with pytest.raises(ValueError, match="num_prompts"):
        random_search(_model_for(sampler), VERIFIER, sampler, (2,), num_candidates=2, progress=False,
                      component=component, other=torch.zeros(3))


def test_nan_scores_are_never_best():
    sampler = FlowSampler(4)

    def verifier(x0):
        scores = VERIFIER(x0)
        return torch.where(torch.arange(x0.shape[0]) % 2 == 0, torch.nan, scores)

    result = random_search(_model_for(sampler), verifier, sampler, (2,), num_candidates=6, num_prompts=2, seed=0,
                           progress=False)
    assert not torch.isnan(result.score).any()
    assert torch.isnan(result.scores[:, ::2]).all()


def test_bad_input_raises_naming_the_argument():
    sampler = FlowSampler(6)
    model = _model_for(sampler)
    with pytest.raises(ValueError, match="shape"):
        random_search(model, VERIFIER, sampler, (3,), num_candidates=2, progress=False)
    with pytest.raises(ValueError, match="budget_nfe"):
        random_search(model, VERIFIER, sampler, (2,), budget_nfe=5, progress=False)
    with pytest.raises(ValueError, match="budget_nfe"):
        zero_order_search(model, VERIFIER, sampler, (2,), num_neighbors=4, budget_nfe=29, progress=False)
    with pytest.raises(ValueError, match="budget_nfe"):
        random_search(model, VERIFIER, sampler, (2,), num_candidates=2, budget_nfe=100, progress=False)
    with pytest.raises(ValueError, match="num_candidates"):
        random_search(model, VERIFIER, sampler, (2,), progress=False)
    stochastic = FlowSampler(6, stochastic=True)
    for search, argument, options in [
        (random_search, "num_candidates", {}),
        (zero_order_search, "num_neighbors", {"iterations": 2}),
        (zero_order_search, "iterations", {}),
        (paths_search, "num_paths", {}),
        (paths_search, "branches", {"num_paths": 2}),
        (paths_search, "forward_interval", {"num_paths": 2}),
        (paths_search, "backward_interval", {"num_paths": 2}),
        (fk_steering, "num_particles", {}),
        (fk_steering, "resample_every", {"num_particles": 2}),
        (random_search, "batch_size", {"num_candidates": 2}),
        (random_search, "num_prompts", {"num_candidates": 2}),
        (random_search, "budget_nfe", {}),
    ]:
        for bad in (0, -3):
            with pytest.raises(ValueError, match=argument):
                search(model, VERIFIER, stochastic if search is fk_steering else sampler, (2,), progress=False,
                       **{argument: bad}, **options)
    with pytest.raises(ValueError, match="start_level"):
        paths_search(model, VERIFIER, sampler, (2,), num_paths=2, start_level=6, progress=False)
    with pytest.raises(ValueError, match="backward_interval"):
        paths_search(model, VERIFIER, sampler, (2,), num_paths=2, forward_interval=2, backward_interval=2,
                     progress=False)
    with pytest.raises(ValueError, match="potential"):
        fk_steering(model, VERIFIER, stochastic, (2,), num_particles=2, potential="min", progress=False)
    with pytest.raises(ValueError, match="ess_threshold"):
        fk_steering(model, VERIFIER, stochastic, (2,), num_particles=2, ess_threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="cos_sim"):
        zero_order_search(model, VERIFIER, sampler, (2,), iterations=1, cos_sim=2.0, progress=False)
    for search, argument, bad, options in [
        (random_search, "num_candidates", 2.5, {}),
        (random_search, "budget_nfe", "64", {}),
        (random_search, "seed", 1.0, {"num_candidates": 2}),
        (zero_order_search, "cos_sim", "0.9", {"iterations": 1}),
        (paths_search, "branches", 2.0, {"num_paths": 1}),
        (fk_steering, "lam", None, {"num_particles": 2}),
    ]:
        with pytest.raises(TypeError, match=argument):
            search(model, VERIFIER, stochastic if search is fk_steering else sampler, (2,), progress=False,
                   **{argument: bad}, **options)
    with pytest.raises(TypeError, match="sampler"):
        random_search(model, VERIFIER, "euler", (2,), num_candidates=2, progress=False)
    with pytest.raises(TypeError, match="shape"):
        random_search(model, VERIFIER, sampler, "2", num_candidates=2, progress=False)
    with pytest.raises(ValueError, match="verifier"):
        random_search(model, lambda x0: x0, sampler, (2,), num_candidates=2, progress=False)
