"""Noise search through diffusers pipelines (``search_pipeline``), on tiny randomly initialised models."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastsearch  # noqa: E402
from fastsearch.diffusion import (  # noqa: E402
    DDIMSampler,
    FKSteering,
    PathsSearch,
    RandomSearch,
    ZeroOrderSearch,
    zero_order_search,
)
from fastsearch.integrations.diffusers import FastDDIMScheduler, search_pipeline, steering  # noqa: E402
from fastsearch.models import gmm  # noqa: E402
from fastsearch.models.digits import one_thread  # noqa: E402
from fastsearch.seeding import Stream, derive_seed  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The models here are tiny: threads only add overhead (a lot of it on a busy machine)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


# -- search through a pipeline ------------------------------------------------------------------------------------

STEPS = 3


@pytest.fixture(scope="module")
def kandinsky():
    """A tiny Kandinsky 2.2 decoder pipeline (UNet + MoVQ, random weights): it takes latents=."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image", encoder_hid_dim=12,
        encoder_hid_dim_type="image_proj", cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift").eval()
    movq = diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, norm_num_groups=8, num_vq_embeddings=8, vq_embed_dim=4,
                             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")).eval()
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=FastDDIMScheduler(), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request(generator_seed=0):
    g = torch.Generator().manual_seed(42)
    return {"image_embeds": torch.randn(2, 12, generator=g), "negative_image_embeds": torch.zeros(2, 12),
            "height": 16, "width": 16, "num_inference_steps": STEPS, "guidance_scale": 2.0,
            "generator": torch.Generator().manual_seed(generator_seed)}


def brightness(images):
    """Toy verifier: the mean of the red channel."""
    return images[:, 0].mean(dim=(1, 2))


def test_random_search_through_a_pipeline(kandinsky):
    plain = kandinsky(**_request(), output_type="pt").images
    result = search_pipeline(kandinsky, brightness, RandomSearch(num_candidates=3), seed=1, progress=False,
                             **_request())
    assert result.scores.shape == (2, 3)
    torch.testing.assert_close(result.scores[:, 0], brightness(plain), rtol=0, atol=0)  # candidate 0: no search
    torch.testing.assert_close(result.score, result.scores.max(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(brightness(result.sample), result.score)
    assert result.nfe == 3 * STEPS and result.total_nfe == 2 * 3 * STEPS and result.verifier_calls == 6
    assert [entry["nfe"] for entry in result.history] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert "step" not in vars(kandinsky.scheduler), "the step counter is removed"
    # the reported initial latents reproduce the best images
    again = kandinsky(**{**_request(), "latents": result.noise}, output_type="pt").images
    torch.testing.assert_close(again, result.sample)
    same = search_pipeline(kandinsky, brightness, "random", budget_nfe=3 * STEPS + 1, seed=1, progress=False,
                           **_request())
    assert torch.equal(same.scores, result.scores)


def test_zero_order_search_through_a_pipeline(kandinsky):
    result = search_pipeline(kandinsky, brightness, ZeroOrderSearch(num_neighbors=2, iterations=2), seed=3,
                             progress=False, **_request())
    assert result.scores.shape == (2, 2 * 3)
    assert result.nfe == 2 * 3 * STEPS and result.verifier_calls == 2 * 2 * 3
    assert len(result.history) == 2
    first, second = result.history
    assert bool((second["best_score"] >= first["best_score"]).all())
    torch.testing.assert_close(result.score, result.scores.max(dim=1).values, rtol=0, atol=0)
    # a pivot that moved is the winning neighbour: re-scored first in the next round
    moved = first["moved"]
    torch.testing.assert_close(result.scores[moved, 3], first["round_best"][moved], rtol=0, atol=0)
    assert torch.equal(first["round_best"], result.scores[:, :3].max(dim=1).values)


def test_search_pipeline_bad_input(kandinsky, unet):
    two = RandomSearch(num_candidates=2)
    with pytest.raises(ValueError, match="search must be one of"):
        search_pipeline(kandinsky, brightness, "beam", **_request())
    with pytest.raises(TypeError, match="search must be a RandomSearch"):
        search_pipeline(kandinsky, brightness, {"num_candidates": 2}, **_request())
    with pytest.raises(TypeError, match=r"num_candidates= is an option of RandomSearch"):
        search_pipeline(kandinsky, brightness, "random", num_candidates=2, **_request())
    with pytest.raises(ValueError, match="does not take latents="):
        search_pipeline(diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()), brightness, two)
    with pytest.raises(ValueError, match="chosen by the search"):
        search_pipeline(kandinsky, brightness, two, latents=torch.zeros(2, 4, 8, 8), **_request())
    with pytest.raises(ValueError, match="exactly one of num_candidates and budget_nfe"):
        search_pipeline(kandinsky, brightness, progress=False, **_request())
    with pytest.raises(ValueError, match="exactly one of iterations and budget_nfe"):
        search_pipeline(kandinsky, brightness, ZeroOrderSearch(iterations=2), budget_nfe=100, progress=False,
                        **_request())
    with pytest.raises(ValueError, match="budget_nfe must be at least 1"):
        search_pipeline(kandinsky, brightness, "zero_order", budget_nfe=0, progress=False, **_request())
    with pytest.raises(ValueError, match="smaller than one round"):
        search_pipeline(kandinsky, brightness, "zero_order", budget_nfe=STEPS, progress=False, **_request())
    with pytest.raises(ValueError, match="one score per image"):
        search_pipeline(kandinsky, lambda images: images.mean(), two, progress=False, **_request())
    with pytest.raises(TypeError, match="verifier must return a tensor"):
        search_pipeline(kandinsky, lambda images: images.tolist(), two, progress=False, **_request())
    with pytest.raises(TypeError, match="verifier must be callable"):
        search_pipeline(kandinsky, "clip", two, progress=False, **_request())
    assert "step" not in vars(kandinsky.scheduler), "restored after the errors raised inside the pipeline call"


@pytest.mark.parametrize("options,error,match", [
    (lambda: RandomSearch(num_candidates=0), ValueError, "num_candidates must be at least 1"),
    (lambda: RandomSearch(num_candidates=2.0), TypeError, "num_candidates must be an int"),
    (lambda: ZeroOrderSearch(num_neighbors=0), ValueError, "num_neighbors must be at least 1"),
    (lambda: ZeroOrderSearch(num_neighbors="4"), TypeError, "num_neighbors must be an int"),
    (lambda: ZeroOrderSearch(iterations=0), ValueError, "iterations must be at least 1"),
    (lambda: ZeroOrderSearch(cos_sim=1.5), ValueError, "cos_sim must be <= 1"),
    (lambda: ZeroOrderSearch(cos_sim=float("nan")), ValueError, "cos_sim must be a finite number"),
    (lambda: ZeroOrderSearch(cos_sim="high"), TypeError, "cos_sim must be a float"),
    (lambda: PathsSearch(num_paths=-1), ValueError, "num_paths must be at least 1"),
    (lambda: PathsSearch(branches=0), ValueError, "branches must be at least 1"),
    (lambda: PathsSearch(branches=True), TypeError, "branches must be an int"),
    (lambda: PathsSearch(start_level=0), ValueError, "start_level must be at least 1"),
    (lambda: PathsSearch(forward_interval=0), ValueError, "forward_interval must be at least 1"),
    (lambda: PathsSearch(backward_interval=1.5), TypeError, "backward_interval must be an int"),
    (lambda: PathsSearch(forward_interval=2, backward_interval=2), ValueError, "backward_interval .* must exceed"),
    (lambda: FKSteering(num_particles=0), ValueError, "num_particles must be at least 1"),
    (lambda: FKSteering(potential="sum"), ValueError, "potential must be one of"),
    (lambda: FKSteering(potential=1), TypeError, "potential must be a str"),
    (lambda: FKSteering(lam=-1.0), ValueError, "lam must be >= 0"),
    (lambda: FKSteering(lam="1"), TypeError, "lam must be a float"),
    (lambda: FKSteering(resample_every=0), ValueError, "resample_every must be at least 1"),
    (lambda: FKSteering(ess_threshold=1.5), ValueError, "ess_threshold must be <= 1"),
    (lambda: FKSteering(eta=0.0), ValueError, "eta must be > 0"),
    (lambda: FKSteering(eta=None), TypeError, "eta must be a float"),
])
def test_search_options_reject_bad_values_naming_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        options()


def test_search_options_are_frozen_and_checked_values_are_converted():
    options = FKSteering(num_particles=torch.tensor(4), lam=2, ess_threshold=torch.tensor(0.25))
    assert options == FKSteering(num_particles=4, lam=2.0, ess_threshold=0.25)
    assert type(options.num_particles) is int and type(options.lam) is float
    with pytest.raises(AttributeError):
        options.lam = 3.0
    assert ZeroOrderSearch(num_neighbors=3).width == 4
    with pytest.raises(ValueError, match=r"start_level must be an int in \[1, num_steps - 1 = 5\]"):
        PathsSearch(start_level=6).plan(6)
    with pytest.raises(ValueError, match="backward_interval"):
        PathsSearch(backward_interval=1).plan(10)  # the default forward_interval is 1
    plan = PathsSearch(start_level=4, forward_interval=2, backward_interval=4).plan(8)
    assert (plan.start, plan.rounds) == (4, ((4, 2, 6), (6, 4, 8)))
    assert plan.evaluations() == ([0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7], {3: 0, 7: 1})


# -- search over paths and FK steering: one steered pipeline call --------------------------------------------------


class GMMPipeline:
    """A minimal pipeline with diffusers' loop (set_timesteps, model + step per timestep) around the exact
    epsilon model of a Gaussian mixture: the searches through it can be checked against fastsearch.diffusion."""

    def __init__(self, scheduler, mixture):
        self.scheduler = scheduler
        self.model = mixture.vp_model(scheduler.alphas_cumprod)

    def __call__(self, num_inference_steps: int = 10, num_images_per_prompt: int = 1, generator=None, latents=None,
                 output_type: str = "pt"):
        self.scheduler.set_timesteps(num_inference_steps)
        if latents is None:
            latents = torch.randn(num_images_per_prompt, self.model.mixture.dim, generator=generator)
        for t in self.scheduler.timesteps:
            level = torch.full((latents.shape[0],), int(t), dtype=torch.int64)
            latents = self.scheduler.step(self.model(latents, level), t, latents, generator=generator).prev_sample
        return diffusers.ImagePipelineOutput(images=latents)


@pytest.fixture(scope="module")
def mixture():
    return gmm.rare_mode_mixture(dim=4, rare_weight=0.1)


def test_paths_through_a_pipeline_equal_the_sampler_reference(mixture):
    """The steered call equals the same search written with DDIMSampler, renoise and segmented_topk."""
    steps, n, m, seed = 10, 3, 2, 7
    pipe = GMMPipeline(FastDDIMScheduler(clip_sample=False), mixture)
    verifier = gmm.ModeLogDensity(mixture)
    result = search_pipeline(pipe, verifier, PathsSearch(num_paths=n, branches=m), seed=seed, decode=lambda x: x,
                             progress=False, num_inference_steps=steps, generator=torch.Generator().manual_seed(3))

    sampler = DDIMSampler.from_diffusers(pipe.scheduler, steps)
    start, rounds = PathsSearch().plan(steps).start, PathsSearch().plan(steps).rounds
    x = torch.randn(n * m, mixture.dim, generator=torch.Generator().manual_seed(3))  # the pipeline's own draw
    out = sampler.sample(pipe.model, x, stop=start)
    x, x0 = out.sample, out.pred_original_sample
    for index, (current, renoised, following) in enumerate(rounds):
        keep = fastsearch.segmented_topk(verifier(x0)[None], n).indices[0]
        branched = sampler.renoise(x[keep].repeat_interleave(m, dim=0), current, renoised,
                                   seed=derive_seed(seed, Stream.RENOISE, index))
        out = sampler.sample(pipe.model, branched, start=renoised, stop=following)
        x, x0 = out.sample, out.pred_original_sample
    expected = verifier(x)
    torch.testing.assert_close(result.scores[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.score[0], expected.max(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.sample[0], x[expected.argmax()], rtol=1e-4, atol=1e-4)
    plan = start + sum(following - renoised for _, renoised, following in rounds)
    assert result.nfe == result.total_nfe == plan * n * m
    assert result.verifier_calls == (len(rounds) + 1) * n * m
    assert [entry["state"] for entry in result.history] == [start] + [following for _, _, following in rounds]
    assert result.history[-1]["nfe"] == result.nfe
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
    assert len(pipe.scheduler.timesteps) == steps, "the stock timesteps are back"


class SeededGMMPipeline(GMMPipeline):
    """GMMPipeline drawing its own first latents as zero_order_search draws its first pivots (Stream.NOISE, 0)."""

    def __init__(self, scheduler, mixture, seed):
        super().__init__(scheduler, mixture)
        self.seed = seed

    def __call__(self, num_images_per_prompt: int = 1, latents=None, **kwargs):
        if latents is None:
            latents = fastsearch.randn((num_images_per_prompt, self.model.mixture.dim),
                                       seed=derive_seed(self.seed, Stream.NOISE, 0))
        return super().__call__(num_images_per_prompt=num_images_per_prompt, latents=latents, **kwargs)


def test_zero_order_through_a_pipeline_is_zero_order_search(mixture):
    """Both run the rounds of fastsearch.diffusion.core: from the same first pivots and seed, the pipeline (one
    call per candidate) and zero_order_search (one batch per round) draw the same neighbours and restarts."""
    steps, slots, seed = 8, 5, 11
    options = ZeroOrderSearch(num_neighbors=3, cos_sim=0.9, iterations=5)
    verifier = gmm.ModeLogDensity(mixture)
    pipe = SeededGMMPipeline(FastDDIMScheduler(clip_sample=False), mixture, seed)
    through = search_pipeline(pipe, verifier, options, seed=seed, progress=False, num_inference_steps=steps,
                              num_images_per_prompt=slots)
    sampler = DDIMSampler.from_diffusers(pipe.scheduler, steps)
    direct = zero_order_search(pipe.model, verifier, sampler, (mixture.dim,), num_neighbors=3, cos_sim=0.9,
                               iterations=5, num_prompts=slots, seed=seed, progress=False)
    torch.testing.assert_close(through.scores, direct.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(through.sample, direct.sample, rtol=1e-5, atol=1e-5)
    assert torch.equal(through.noise, direct.noise)
    assert through.nfe == direct.nfe == 5 * 4 * steps and through.verifier_calls == direct.verifier_calls
    for ours, theirs in zip(through.history, direct.history, strict=True):
        assert torch.equal(ours["pivot"], theirs["pivot"])
        assert torch.equal(ours["moved"], theirs["moved"]) and torch.equal(ours["restarted"], theirs["restarted"])
        assert ours["nfe"] == theirs["nfe"]
    moved = torch.stack([entry["moved"] for entry in direct.history[:-1]])
    assert moved.any() and not moved.all(), "both moves and restarts are compared"


def test_fk_through_a_pipeline_steers_toward_the_reward(mixture):
    verifier = gmm.ComponentPosterior(mixture)  # the rare mode, 10% of the mass
    pipe = GMMPipeline(diffusers.DDIMScheduler(clip_sample=False), mixture)
    runs = {lam: search_pipeline(pipe, verifier, FKSteering(num_particles=64, potential="r_t", lam=lam,
                                                            resample_every=2),
                                 seed=0, decode=lambda x: x, progress=False, num_inference_steps=10,
                                 generator=torch.Generator().manual_seed(0)) for lam in (0.0, 5.0)}
    plain, steered = runs[0.0], runs[5.0]
    assert not any(bool(entry["resampled"].any()) for entry in plain.history), "lam = 0: uniform weights"
    assert any(bool(entry["resampled"].any()) for entry in steered.history)
    # about 7% of plain samples land in the rare mode; steered, most do (seeds 0-3 give 0.6 to 1.0)
    assert steered.scores.mean() > plain.scores.mean() + 0.3, (steered.scores.mean(), plain.scores.mean())
    for result in runs.values():
        assert result.nfe == 10 * 64 and result.scores.shape == (1, 64)
        assert [entry["step"] for entry in result.history] == [1, 3, 5, 7, 9]
        assert result.verifier_calls == 5 * 64
        torch.testing.assert_close(result.score, result.scores.max(dim=1).values, rtol=0, atol=0)
    resampled = next(entry for entry in steered.history if bool(entry["resampled"].any()))
    ancestors = resampled["ancestors"]
    assert ancestors.shape == (1, 64) and int(ancestors.min()) >= 0 and int(ancestors.max()) < 64
    # resampling follows the weights: the heaviest particle has descendants
    assert int(resampled["log_weights"].argmax()) in ancestors.flatten().tolist()
    again = search_pipeline(pipe, verifier, FKSteering(num_particles=64, potential="r_t", lam=5.0, resample_every=2),
                            seed=0, decode=lambda x: x, progress=False, num_inference_steps=10,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.scores, steered.scores)


def _flow_ready(scheduler):
    """Kandinsky multiplies its first latents by init_noise_sigma, which flow schedulers (sigma_max = 1) lack."""
    scheduler.init_noise_sigma = 1.0
    return scheduler


@pytest.mark.parametrize("scheduler", ["fast_ddim", "ddpm", "flow"])
def test_paths_and_fk_through_kandinsky(kandinsky, scheduler):
    stock = kandinsky.scheduler
    if scheduler == "ddpm":
        kandinsky.scheduler = diffusers.DDPMScheduler()
    elif scheduler == "flow":
        kandinsky.scheduler = _flow_ready(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    try:
        request = {**_request(), "num_inference_steps": 6}
        paths = search_pipeline(kandinsky, brightness, PathsSearch(num_paths=2, branches=2), seed=1, progress=False,
                                **request)
        plan = len(PathsSearch().plan(6).evaluations()[0])
        assert paths.scores.shape == (2, 4) and paths.nfe == plan * 4 and paths.total_nfe == 2 * plan * 4
        torch.testing.assert_close(paths.score, paths.scores.max(dim=1).values, rtol=0, atol=0)
        torch.testing.assert_close(brightness(paths.sample), paths.score)
        fk = search_pipeline(kandinsky, brightness, FKSteering(num_particles=3, lam=50.0, resample_every=2), seed=1,
                             progress=False, **request)
        assert fk.scores.shape == (2, 3) and fk.nfe == 6 * 3 and fk.verifier_calls == 3 * 2 * 3
        torch.testing.assert_close(brightness(fk.sample), fk.score)
        assert "set_timesteps" not in vars(kandinsky.scheduler)
    finally:
        kandinsky.scheduler = stock


def test_paths_and_fk_budgets_and_per_image_verifier_arguments(kandinsky):
    request = {**_request(), "num_inference_steps": 6}
    start, rounds = PathsSearch().plan(6).start, PathsSearch().plan(6).rounds
    plan = start + sum(following - renoised for _, renoised, following in rounds)
    seen = []

    def labelled(images, label):
        seen.append(label.clone())
        return brightness(images) * label

    label = torch.tensor([1.0, -1.0])
    paths = search_pipeline(kandinsky, labelled, PathsSearch(branches=2), budget_nfe=plan * 2 * 2 + 1, seed=0,
                            progress=False, verifier_kwargs={"label": label}, **request)
    assert paths.scores.shape == (2, 4), "budget // (plan x branches) = 2 paths"
    assert all(torch.equal(rows, label.repeat_interleave(4)) for rows in seen), "each slot's label on its rows"
    fk = search_pipeline(kandinsky, brightness, "fk", budget_nfe=6 * 3, seed=0, progress=False, **request)
    assert fk.scores.shape == (2, 3)
    seen.clear()  # no scoring step before the end: the final images still get each slot's label
    search_pipeline(kandinsky, labelled, FKSteering(num_particles=3, resample_every=6), seed=0, progress=False,
                    verifier_kwargs={"label": label}, **request)
    assert len(seen) == 1 and torch.equal(seen[0], label.repeat_interleave(3))


def test_paths_and_fk_bad_input(kandinsky, unet, mixture, monkeypatch):
    request = {**_request(), "num_inference_steps": 6}
    with pytest.raises(ValueError, match="exactly one of num_paths and budget_nfe"):
        search_pipeline(kandinsky, brightness, "paths", progress=False, **request)
    one_path, two_particles = PathsSearch(num_paths=1), FKSteering(num_particles=2)
    with pytest.raises(ValueError, match="start_level must be an int in"):
        search_pipeline(kandinsky, brightness, PathsSearch(num_paths=1, start_level=6), progress=False, **request)
    with pytest.raises(ValueError, match="branches must be at least 1"):
        search_pipeline(kandinsky, brightness, PathsSearch(num_paths=1, branches=0), progress=False, **request)
    with pytest.raises(ValueError, match="smaller than one particle"):
        search_pipeline(kandinsky, brightness, "fk", budget_nfe=5, progress=False, **request)
    with pytest.raises(ValueError, match="eta must be > 0"):
        search_pipeline(kandinsky, brightness, FKSteering(num_particles=2, eta=0.0), progress=False, **request)
    with pytest.raises(ValueError, match="potential must be one of"):
        search_pipeline(kandinsky, brightness, FKSteering(num_particles=2, potential="sum"), progress=False,
                        **request)
    with pytest.raises(ValueError, match="one torch.Generator"):
        search_pipeline(kandinsky, brightness, two_particles, progress=False,
                        **{**request, "generator": [torch.Generator(), torch.Generator()]})
    with pytest.raises(ValueError, match="shaped like the pipeline's output"):
        search_pipeline(kandinsky, brightness, two_particles, progress=False, decode=lambda x: x, **request)
    with pytest.raises(TypeError, match="decode must be callable"):
        search_pipeline(kandinsky, brightness, two_particles, progress=False, decode="movq", **request)
    with monkeypatch.context() as patch:  # a default decoder that the pipeline's own images contradict
        stock_decoder = steering.default_decoder
        patch.setattr(steering, "default_decoder", lambda pipe: lambda x: stock_decoder(pipe)(x) * 0.5 + 0.5)
        with pytest.raises(ValueError, match="does not reproduce"):
            search_pipeline(kandinsky, brightness, two_particles, progress=False, **request)
    stock = kandinsky.scheduler
    kandinsky.scheduler = diffusers.PNDMScheduler()
    try:
        with pytest.raises(ValueError, match="supports DDIMScheduler, DDPMScheduler"):
            search_pipeline(kandinsky, brightness, one_path, progress=False, **request)
        kandinsky.scheduler = _flow_ready(diffusers.FlowMatchEulerDiscreteScheduler())
        with pytest.raises(ValueError, match="stochastic_sampling=True"):
            search_pipeline(kandinsky, brightness, two_particles, progress=False, **request)
    finally:
        kandinsky.scheduler = stock
    with pytest.raises(ValueError, match="no default decoder"):
        search_pipeline(GMMPipeline(diffusers.DDIMScheduler(), mixture), gmm.ModeLogDensity(mixture), one_path,
                        progress=False)
    with pytest.raises(ValueError, match="num_images_per_prompt= or batch_size="):
        search_pipeline(lambda_pipeline(kandinsky), brightness, two_particles, decode=lambda x: x, progress=False)
    assert "step" not in vars(kandinsky.scheduler) and "set_timesteps" not in vars(kandinsky.scheduler)


def lambda_pipeline(pipe):
    """A pipeline-like callable without num_images_per_prompt or batch_size."""
    class Plain:
        scheduler = pipe.scheduler

        def __call__(self, output_type: str = "pt"):
            raise AssertionError("never called")
    return Plain()
