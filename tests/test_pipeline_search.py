"""Noise search through diffusers pipelines (``search_pipeline``), on tiny randomly initialised models."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastsearch.integrations.diffusers import FastDDIMScheduler, search_pipeline  # noqa: E402
from fastsearch.models.digits import one_thread  # noqa: E402


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
    result = search_pipeline(kandinsky, brightness, "random", num_candidates=3, seed=1, progress=False, **_request())
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
    result = search_pipeline(kandinsky, brightness, "zero_order", num_neighbors=2, iterations=2, seed=3,
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
    with pytest.raises(ValueError, match="algorithm must be one of"):
        search_pipeline(kandinsky, brightness, "beam", num_candidates=2, **_request())
    for algorithm in ("paths", "fk"):
        with pytest.raises(NotImplementedError, match=algorithm):
            search_pipeline(kandinsky, brightness, algorithm, **_request())
    with pytest.raises(ValueError, match="does not take latents="):
        search_pipeline(diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()), brightness, num_candidates=2)
    with pytest.raises(ValueError, match="chosen by the search"):
        search_pipeline(kandinsky, brightness, num_candidates=2, latents=torch.zeros(2, 4, 8, 8), **_request())
    with pytest.raises(ValueError, match="exactly one of num_candidates and budget_nfe"):
        search_pipeline(kandinsky, brightness, progress=False, **_request())
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        search_pipeline(kandinsky, brightness, "zero_order", iterations=0, progress=False, **_request())
    with pytest.raises(ValueError, match="smaller than one round"):
        search_pipeline(kandinsky, brightness, "zero_order", budget_nfe=STEPS, progress=False, **_request())
    with pytest.raises(ValueError, match="one score per image"):
        search_pipeline(kandinsky, lambda images: images.mean(), num_candidates=2, progress=False, **_request())
    assert "step" not in vars(kandinsky.scheduler)
