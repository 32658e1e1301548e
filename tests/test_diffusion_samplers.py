"""DDIMSampler and FlowSampler: schedules and whole trajectories against diffusers, per-sample start / stop,
NFE accounting, conditioning that follows the rows, and bad input."""

import pytest
import torch

import fastsearch
from fastsearch.diffusion import DDIMSampler, FlowSampler
from fastsearch.seeding import derive_seed

diffusers = pytest.importorskip("diffusers")
flow_euler_module = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")


# small tensors: on a loaded machine intra-op threads only add wake-up latency (seconds per test)
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(x, level, **cond):
    """A smooth stand-in for a denoiser: depends on the sample and the (per-sample) level."""
    level = level.float().reshape(-1, *([1] * (x.dim() - 1)))
    return 0.4 * x * torch.cos(level / 300) + 0.2 * torch.sin(1.7 * x + level / 97)


def _flow_model(x, sigma, **cond):
    """Like _model, for sigmas in [0, 1]."""
    return _model(x, sigma * 1000.0)


class Counting:
    """Wraps a model, counting the rows it evaluates and the largest call."""

    def __init__(self, model):
        self.model = model
        self.rows = 0
        self.largest = 0

    def __call__(self, x, level, **cond):
        self.rows += x.shape[0]
        self.largest = max(self.largest, x.shape[0])
        return self.model(x, level, **cond)


def _assert_close(out, expected, rtol=1e-5):
    scale = max(1.0, expected.abs().max().item())
    err = (out - expected).abs().max().item()
    assert err <= rtol * scale, f"max error {err} > {rtol} x scale {scale}"


# -- schedules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("num_steps", [1, 7, 50, 333])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_schedule_equals_diffusers(spacing, offset, num_steps, set_alpha_to_one):
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset,
                                        set_alpha_to_one=set_alpha_to_one, beta_schedule="scaled_linear")
    scheduler.set_timesteps(num_steps)
    sampler = DDIMSampler.from_diffusers(scheduler)
    assert torch.equal(sampler.levels, scheduler.timesteps)
    ratio = scheduler.config.num_train_timesteps // num_steps
    for i, t in enumerate(scheduler.timesteps.tolist()):
        assert sampler.noise_level(i) == scheduler.alphas_cumprod[t]
        expected_prev = scheduler.alphas_cumprod[t - ratio] if t - ratio >= 0 else scheduler.final_alpha_cumprod
        assert sampler._alpha_prev_cpu[i] == expected_prev
    assert sampler.noise_level(num_steps) == sampler._alpha_prev_cpu[-1]


@pytest.mark.parametrize("num_steps", [2, 7, 28, 50])  # shift_terminal with 1 step divides 0 by 0 in diffusers
@pytest.mark.parametrize("config", [
    {}, {"shift": 3.0}, {"shift": 0.5, "num_train_timesteps": 500}, {"shift_terminal": 0.1, "shift": 2.0},
    {"use_dynamic_shifting": True, "mu": 0.8}, {"use_dynamic_shifting": True, "mu": 1.3, "time_shift_type": "linear"},
], ids=["default", "shift3", "shift0.5-T500", "terminal", "dynamic", "dynamic-linear"])
def test_flow_sigmas_equal_diffusers(num_steps, config):
    config = dict(config)
    mu = config.pop("mu", None)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(num_steps, mu=mu)
    sampler = FlowSampler.from_diffusers(scheduler, mu=mu)
    assert torch.equal(sampler.levels, scheduler.sigmas[:-1])
    assert torch.equal(sampler.noise_levels, scheduler.sigmas)
    if not config:
        assert torch.equal(FlowSampler(num_steps).levels, scheduler.sigmas[:-1])
        scheduler.set_timesteps(1)
        assert torch.equal(FlowSampler(1).levels, scheduler.sigmas[:-1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_sigmas_equal_diffusers(shift):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(12)
    sampler = FlowSampler.from_diffusers(scheduler)
    assert sampler.solver == "heun"
    assert torch.equal(sampler.noise_levels, torch.unique_consecutive(scheduler.sigmas))
    assert torch.equal(FlowSampler(12, shift=shift, solver="heun").levels, sampler.levels)


# -- trajectories against diffusers -----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_trajectory_equals_diffusers(prediction_type, eta, clip_sample):
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample, steps_offset=1)
    scheduler.set_timesteps(25)
    sampler = DDIMSampler.from_diffusers(scheduler, eta=eta)
    x = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    seed = 11
    expected = x.clone()
    for j, t in enumerate(scheduler.timesteps):
        noise = fastsearch.randn(x.shape, seed=derive_seed(seed, j)) if eta > 0 else None
        step = scheduler.step(_model(expected, t.expand(3)), t, expected, eta=eta, variance_noise=noise)
        expected = step.prev_sample
    out = sampler.sample(_model, x, seed=seed)
    _assert_close(out.sample, expected)
    _assert_close(out.pred_original_sample, step.pred_original_sample)
    assert out.nfe == 3 * 25


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_euler_trajectory_equals_diffusers(shift, stochastic, monkeypatch):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)
    scheduler.set_timesteps(30)
    sampler = FlowSampler.from_diffusers(scheduler)
    assert sampler.stochastic == stochastic
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    seed = 5
    step_noise = iter([fastsearch.randn(x.shape, seed=derive_seed(seed, j)) for j in range(30)])
    # diffusers draws the stochastic step's noise itself: hand it the same Philox noise
    monkeypatch.setattr(flow_euler_module, "randn_tensor", lambda *args, **kwargs: next(step_noise))
    expected = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].expand(2)
        expected = scheduler.step(_flow_model(expected, sigma), t, expected).prev_sample
    out = sampler.sample(_flow_model, x, seed=seed)
    _assert_close(out.sample, expected)
    assert out.nfe == 2 * 30


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_trajectory_equals_diffusers(shift):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    sampler = FlowSampler.from_diffusers(scheduler)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    expected = x.clone()
    for k, t in enumerate(scheduler.timesteps):  # call k evaluates the model at sigmas[k]
        expected = scheduler.step(_flow_model(expected, scheduler.sigmas[k].expand(2)), t, expected).prev_sample
    model = Counting(_flow_model)
    out = sampler.sample(model, x)
    _assert_close(out.sample, expected)
    assert out.nfe == model.rows == 2 * len(scheduler.timesteps) == 2 * (2 * 10 - 1)


# -- per-sample start / stop, NFEs, conditioning ---------------------------------------------------------------

SAMPLERS = {
    "ddim": lambda: DDIMSampler(diffusers.DDIMScheduler().alphas_cumprod, 12, prediction_type="v_prediction"),
    "ddim-trailing": lambda: DDIMSampler(diffusers.DDIMScheduler().alphas_cumprod, 9, timestep_spacing="trailing"),
    "euler": lambda: FlowSampler(12, shift=2.0),
    "heun": lambda: FlowSampler(12, solver="heun"),
}


def _model_for(sampler):
    return _flow_model if isinstance(sampler, FlowSampler) else _model


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_start_stop_equal_separate_runs(name):
    sampler = SAMPLERS[name]()
    n = sampler.num_steps
    start = torch.tensor([0, 3, 0, 5, 2, n])
    stop = torch.tensor([n, 7, 4, n, 2, n])
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(3))
    model = Counting(_model_for(sampler))
    out = sampler.sample(model, x, start=start, stop=stop)
    for i in range(6):
        alone = sampler.sample(_model_for(sampler), x[i:i + 1], start=int(start[i]), stop=int(stop[i]))
        torch.testing.assert_close(out.sample[i:i + 1], alone.sample, rtol=1e-6, atol=1e-6)
        if start[i] < stop[i]:
            torch.testing.assert_close(out.pred_original_sample[i:i + 1], alone.pred_original_sample, rtol=1e-6,
                                       atol=1e-6)
        else:
            assert torch.isnan(out.pred_original_sample[i]).all()
            assert torch.equal(out.sample[i], x[i])
    assert out.nfe == model.rows == int(sampler.nfe(start, stop).sum())


def test_nfe_counts():
    assert FlowSampler(10).nfe() == 10
    assert FlowSampler(10, solver="heun").nfe() == 19
    assert FlowSampler(10, solver="heun").nfe(0, 9) == 18
    assert FlowSampler(10, solver="heun").nfe(9, 10) == 1
    assert FlowSampler(10, solver="heun").nfe(4, 4) == 0
    heun = FlowSampler(10, solver="heun")
    assert heun.nfe(torch.tensor([0, 8, 9]), torch.tensor([10, 10, 10])).tolist() == [19, 3, 1]
    assert DDIMSampler(torch.linspace(0.999, 0.01, 1000), 20).nfe(5) == 15


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_batch_size_chunks_model_calls(name):
    sampler = SAMPLERS[name]()
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(4))
    model = Counting(_model_for(sampler))
    start = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    chunked = sampler.sample(model, x, start=start, batch_size=3)
    assert model.largest == 3
    whole = sampler.sample(_model_for(sampler), x, start=start)
    torch.testing.assert_close(chunked.sample, whole.sample, rtol=1e-6, atol=1e-6)
    assert chunked.nfe == model.rows


def test_per_sample_conditioning_follows_the_rows():
    """A tensor with B rows is split with the samples; other values are passed whole to every call."""
    sampler = FlowSampler(8, solver="heun")
    seen = []

    def model(x, sigma, scale, offset, bias):
        seen.append((x.shape[0], scale.shape[0], offset.shape[0]))
        assert scale.shape[0] == x.shape[0] and offset.shape == (3,) and bias == 0.5
        return _flow_model(x, sigma) * scale[:, None] + bias

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    scale = torch.linspace(0.5, 1.5, 5)
    start = torch.tensor([0, 2, 4, 6, 7])
    out = sampler.sample(model, x, start=start, batch_size=2, scale=scale, offset=torch.zeros(3), bias=0.5)
    for i in range(5):
        alone = sampler.sample(model, x[i:i + 1], start=int(start[i]), scale=scale[i:i + 1], offset=torch.zeros(3),
                               bias=0.5)
        torch.testing.assert_close(out.sample[i:i + 1], alone.sample, rtol=1e-6, atol=1e-6)
    assert all(rows <= 2 for rows, _, _ in seen)


@pytest.mark.parametrize("sampler", [DDIMSampler(torch.linspace(0.999, 0.01, 1000), 10, eta=0.7),
                                     FlowSampler(10, stochastic=True)], ids=["ddim-eta", "flow-stochastic"])
def test_stochastic_sampling_is_deterministic_per_seed(sampler):
    model = _flow_model if isinstance(sampler, FlowSampler) else _model
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    first = sampler.sample(model, x, seed=3).sample
    assert torch.equal(first, sampler.sample(model, x, seed=3).sample)
    assert not torch.allclose(first, sampler.sample(model, x, seed=4).sample)
    torch.manual_seed(0)
    drawn = sampler.sample(model, x).sample
    torch.manual_seed(0)
    assert torch.equal(drawn, sampler.sample(model, x).sample)


def test_predict_x0_matches_the_steps():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    ddim = SAMPLERS["ddim"]()
    index = torch.tensor([0, 5, 11])
    output = _model(x, ddim.levels[index])
    out = ddim.sample(_model, x, start=index, stop=index + 1)
    torch.testing.assert_close(ddim.predict_x0(x, output, index), out.pred_original_sample)
    flow = SAMPLERS["euler"]()
    velocity = _flow_model(x, flow.levels[index])
    expected = x - flow.levels[index][:, None] * velocity
    torch.testing.assert_close(flow.predict_x0(x, velocity, index), expected)
    torch.testing.assert_close(flow.sample(_flow_model, x, start=index, stop=index + 1).pred_original_sample,
                               expected)


def test_sampler_renoise_uses_the_state_levels():
    flow = FlowSampler(10)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(8))
    expected = fastsearch.renoise(x, flow.noise_level(6), flow.noise_level(2), schedule="flow", seed=1)
    torch.testing.assert_close(flow.renoise(x, 6, 2, seed=1), expected)
    ddim = SAMPLERS["ddim"]()
    frm, to = torch.tensor([12, 5, 7, 3]), torch.tensor([4, 5, 0, 1])
    expected = fastsearch.renoise(x, ddim.noise_level(frm), ddim.noise_level(to), schedule="vp", seed=2)
    torch.testing.assert_close(ddim.renoise(x, frm, to, seed=2), expected)


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    alphas = torch.linspace(0.999, 0.01, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(alphas, 0)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(alphas, 1001)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMSampler(alphas, 10, prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMSampler(alphas, 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(alphas, 10, eta=-1.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDIMSampler(torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="solver"):
        FlowSampler(10, solver="rk4")
    with pytest.raises(ValueError, match="stochastic"):
        FlowSampler(10, solver="heun", stochastic=True)
    with pytest.raises(ValueError, match="sigmas"):
        FlowSampler(3, sigmas=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSampler.from_diffusers(diffusers.DDIMScheduler(thresholding=True), 10)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler.from_diffusers(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="mu"):
        FlowSampler.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSampler.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), 10)
    with pytest.raises(TypeError, match="scheduler"):
        FlowSampler.from_diffusers(diffusers.DDIMScheduler(), 10)
    sampler = FlowSampler(10)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="start"):
        sampler.sample(_flow_model, x, start=11)
    with pytest.raises(ValueError, match="stop"):
        sampler.sample(_flow_model, x, start=torch.tensor([0, 5, 5]), stop=torch.tensor([10, 4, 10]))
    with pytest.raises(ValueError, match="start"):
        sampler.sample(_flow_model, x, start=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="start"):
        sampler.sample(_flow_model, x, start=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(_flow_model, x, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(lambda x, s: x[:, :1], x)
    with pytest.raises(ValueError, match="index_to"):
        sampler.renoise(x, 2, 5, seed=0)
