"""The shipped image verifiers: CLIPScore and the aesthetic predictor on a tiny random CLIP (a tokenizer made
offline), the verifier ensemble against plain Python, their cost, and search_pipeline with them end to end."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from test_pipeline_search import STEPS, _request, kandinsky  # noqa: E402, F401 - kandinsky: the tiny pipeline fixture

import fastsearch  # noqa: E402
from fastsearch.diffusion import (  # noqa: E402
    FKSteering,
    FlowSampler,
    RandomSearch,
    ZeroOrderSearch,
    random_search,
    zero_order_search,
)
from fastsearch.integrations.diffusers import search_pipeline  # noqa: E402
from fastsearch.integrations.verifiers import AestheticScore, CLIPScore  # noqa: E402
from fastsearch.models import gmm  # noqa: E402
from fastsearch.verifiers import AestheticMLP, Ensemble, Metered, VerifierCost, load_aesthetic_mlp  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a red fox", "cat", "blue car"]
OFFSETS = torch.tensor([0, 2, 5, 6])  # ragged: 2, 3 and 1 images
OWNER = torch.tensor([0, 0, 1, 1, 1, 2])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIPModel and its CLIPProcessor, the tokenizer a letter-level BPE written to a tmp folder."""
    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({letter: len(vocab) for letter in LETTERS})
    vocab.update({letter + "</w>": len(vocab) for letter in LETTERS})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_class(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return model, transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is the projection (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _reference_cosines(model, processor, pil_images, prompts, owner):
    """The straightforward computation: processor, get_image_features / get_text_features, normalise, dot."""
    inputs = processor(images=pil_images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]))
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    return (image * text[owner]).sum(-1)


def _uint8_images(count, height=16, width=16, seed=0):
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _pil(images):
    return [Image.fromarray(image.numpy()) for image in images]


# -- CLIPScore ------------------------------------------------------------------------------------------------------


def test_clip_score_equals_transformers_on_ragged_groups(clip):
    model, processor = clip
    pixels = _uint8_images(6)
    expected = _reference_cosines(model, processor, _pil(pixels), PROMPTS, OWNER)
    verifier = CLIPScore(model, processor)
    unit = pixels.permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W] in [0, 1], as a pipeline returns
    torch.testing.assert_close(verifier(unit, PROMPTS, offsets=OFFSETS), expected, atol=1e-5, rtol=0)
    # one prompt per image: consecutive runs of a prompt are its group
    per_image = [PROMPTS[owner] for owner in OWNER.tolist()]
    torch.testing.assert_close(verifier(unit, per_image), expected, atol=1e-5, rtol=0)
    # [-1, 1] tensors, channels-last numpy, PIL images and uint8 tensors are the same images
    signed = CLIPScore(model, processor, image_range=(-1, 1))
    torch.testing.assert_close(signed(unit * 2 - 1, PROMPTS, offsets=OFFSETS), expected, atol=1e-5, rtol=0)
    for images in (pixels.numpy(), _pil(pixels), pixels):
        torch.testing.assert_close(verifier(images, PROMPTS, offsets=OFFSETS), expected, atol=1e-5, rtol=0)
    words = ["a red fox", "cat", "blue car", "dog", "zebra", "sky", "quick brown", "jump"]
    cosines = torch.cat([verifier(unit, word) for word in words])
    scaled = torch.cat([CLIPScore(model, processor, scaled=True)(unit, word) for word in words])
    torch.testing.assert_close(scaled, 100 * cosines.clamp(min=0), atol=1e-3, rtol=0)
    assert (cosines < 0).any() and (cosines > 0).any(), "the clamp of the scaled score is exercised"
    # one prompt for all
    torch.testing.assert_close(verifier(unit[:2], "a red fox"), expected[:2], atol=1e-5, rtol=0)
    assert verifier.cost.calls == 6 + len(words) and verifier.cost.images == 6 * (5 + len(words)) + 2 \
        and verifier.cost.seconds > 0


def test_clip_score_goes_through_cosine_scores(clip, monkeypatch):
    model, processor = clip
    seen = []
    original = fastsearch.cosine_scores

    def spy(embeddings, references, *, offsets=None, backend="auto"):
        seen.append((embeddings.shape, references.shape, offsets.tolist()))
        return original(embeddings, references, offsets=offsets, backend=backend)

    monkeypatch.setattr(fastsearch, "cosine_scores", spy)
    CLIPScore(model, processor)(_uint8_images(6), PROMPTS, offsets=OFFSETS)
    assert seen == [((6, 8), (3, 8), OFFSETS.tolist())], "one text embedding per prompt, one call"


def test_clip_score_resizes_and_crops_like_the_image_processor(clip):
    model, processor = clip
    pixels = _uint8_images(3, height=20, width=28, seed=1)  # resized to 16 x 22, then centre-cropped to 16 x 16
    expected = _reference_cosines(model, processor, _pil(pixels), ["cat"] * 3, torch.zeros(3, dtype=torch.long))
    scores = CLIPScore(model, processor)(pixels, "cat")
    # tensors are resized in float (no uint8 rounding in between), so PIL and torch agree only closely
    torch.testing.assert_close(scores, expected, atol=2e-2, rtol=0)
    mine = CLIPScore(model, processor).images.pixel_values(pixels)
    theirs = processor(images=_pil(pixels), return_tensors="pt")["pixel_values"]
    assert mine.shape == theirs.shape == (3, 3, 16, 16)
    assert (mine - theirs).abs().mean() < 0.02
    # images of different sizes in one call are resized one by one
    mixed = _pil(_uint8_images(2, seed=2)) + _pil(pixels[:1])
    together = CLIPScore(model, processor)(mixed, "cat")
    assert together.shape == (3,)
    torch.testing.assert_close(together[2], scores[0], atol=1e-5, rtol=0)


def test_clip_score_bad_input(clip):
    model, processor = clip
    verifier = CLIPScore(model, processor)
    images = _uint8_images(6).permute(0, 3, 1, 2).float() / 255
    with pytest.raises(ValueError, match=r"images has values in \[-1.*image_range=\(0, 1\)"):
        verifier(images * 2 - 1, PROMPTS, offsets=OFFSETS)
    with pytest.raises(ValueError, match="outside image_range"):
        verifier(images * 255, PROMPTS, offsets=OFFSETS)
    with pytest.raises(ValueError, match="outside image_range"):
        verifier(torch.full_like(images, float("nan")), PROMPTS, offsets=OFFSETS)
    with pytest.raises(ValueError, match=r"images must be a batch \[B, 3, H, W\]"):
        verifier(images[0], "cat")
    with pytest.raises(ValueError, match="images must have 3 \\(or 1\\) channels"):
        verifier(torch.rand(2, 4, 16, 16), "cat")
    with pytest.raises(ValueError, match="images is empty"):
        verifier(images[:0], "cat")
    with pytest.raises(ValueError, match="images is empty"):
        verifier([], "cat")
    with pytest.raises(TypeError, match="images must be a float tensor"):
        verifier(torch.ones(2, 3, 16, 16, dtype=torch.int32), "cat")
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL image"):
        verifier([images[0], "not an image"], "cat")
    with pytest.raises(ValueError, match="prompts has 3 entries but there are 6 images"):
        verifier(images, PROMPTS)
    with pytest.raises(ValueError, match="prompts has 2 entries but offsets describe 3 groups"):
        verifier(images, PROMPTS[:2], offsets=OFFSETS)
    with pytest.raises(ValueError, match="offsets: group 1 is empty"):
        verifier(images, PROMPTS, offsets=torch.tensor([0, 2, 2, 6]))
    with pytest.raises(ValueError, match="offsets must start at 0 and end at the number of images"):
        verifier(images, PROMPTS, offsets=torch.tensor([0, 2, 5, 7]))
    with pytest.raises(TypeError, match="offsets must be an int64 tensor"):
        verifier(images, PROMPTS, offsets=[0, 2, 5, 6])
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        verifier(images[:2], ["cat", 3])
    with pytest.raises(TypeError, match="prompts must be a str or a sequence"):
        verifier(images[:2], 3)
    with pytest.raises(TypeError, match="model must be a transformers CLIPModel"):
        CLIPScore(torch.nn.Linear(2, 2), processor)
    with pytest.raises(TypeError, match="processor must be a CLIPProcessor"):
        CLIPScore(model, processor.image_processor)
    with pytest.raises(TypeError, match="image_range must be a pair"):
        CLIPScore(model, processor, image_range=1.0)
    with pytest.raises(ValueError, match="image_range must have low < high"):
        CLIPScore(model, processor, image_range=(1, 0))
    with pytest.raises(TypeError, match="scaled must be a bool"):
        CLIPScore(model, processor, scaled="yes")
    assert verifier.cost.calls == 0, "a call that fails is not counted"


# -- the aesthetic predictor ----------------------------------------------------------------------------------------


def _published_layout(width, seed=0):
    """A state dict with the LAION predictor's key layout, made here (no download)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(0, width, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for index, fan_in, fan_out in sizes:
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / math.sqrt(fan_in)
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return state


def test_aesthetic_mlp_loads_the_published_layout(tmp_path):
    state = _published_layout(8)
    mlp = load_aesthetic_mlp(state)
    assert isinstance(mlp, AestheticMLP) and mlp.embed_dim == 8 and not mlp.training
    x = torch.randn(5, 8)
    expected = x
    for index in (0, 2, 4, 6, 7):  # linear layers only: the predictor has no activations
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(mlp(x), expected.squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.save(state, tmp_path / "predictor.pth")
    torch.testing.assert_close(load_aesthetic_mlp(tmp_path / "predictor.pth")(x), mlp(x))
    torch.testing.assert_close(load_aesthetic_mlp({"state_dict": state})(x), mlp(x))
    with pytest.raises(ValueError, match=r"missing \['layers.7.bias'\]"):
        load_aesthetic_mlp({name: value for name, value in state.items() if name != "layers.7.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['layers.8.weight'\]"):
        load_aesthetic_mlp({**state, "layers.8.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"misshapen \['layers.2.weight \[128, 1000\]"):
        load_aesthetic_mlp({**state, "layers.2.weight": torch.zeros(128, 1000)})
    with pytest.raises(ValueError, match="no layers.0.weight"):
        load_aesthetic_mlp({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_aesthetic_mlp(3)


def test_aesthetic_score_is_the_mlp_on_normalised_clip_embeddings(clip):
    model, processor = clip
    mlp = load_aesthetic_mlp(_published_layout(8))
    pixels = _uint8_images(4, seed=3)
    inputs = processor(images=_pil(pixels), return_tensors="pt")
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(_features(model.get_image_features(**inputs)), dim=-1)
        expected = mlp(embeddings)
    verifier = AestheticScore(model, _published_layout(8), processor=processor)
    torch.testing.assert_close(verifier(pixels, prompts=PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # without a processor: the model's image size and OpenAI CLIP's statistics (the tiny processor's are the same)
    torch.testing.assert_close(AestheticScore(model, mlp, batch_size=3)(pixels), expected, atol=1e-5, rtol=1e-5)
    vision_config = transformers.CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "projection_dim": 8})
    vision = transformers.CLIPVisionModelWithProjection(vision_config)
    vision.load_state_dict({name: value for name, value in model.state_dict().items()
                            if name.startswith(("vision_model.", "visual_projection."))})
    torch.testing.assert_close(AestheticScore(vision.eval(), mlp)(pixels), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mlp reads 16-wide embeddings but clip_model projects to 8"):
        AestheticScore(model, AestheticMLP(16))
    with pytest.raises(TypeError, match="mlp must be an AestheticMLP"):
        AestheticScore(model, torch.nn.Linear(8, 1))


# -- the ensemble ---------------------------------------------------------------------------------------------------


def _python_ranks(values):
    """1 (worst) .. n (best), ties sharing their mean rank, NaN below every number."""
    key = [(-math.inf, 0) if math.isnan(v) else (v, 1) for v in values]
    key = [(1, v) if flag else (0, 0.0) for v, flag in key]
    ranks = []
    for mine in key:
        below = sum(other < mine for other in key)
        equal = sum(other == mine for other in key)
        ranks.append(1 + below + (equal - 1) / 2)
    return ranks


def _python_ensemble(member_scores, groups, weights):
    out = []
    for start, end in zip(groups[:-1], groups[1:], strict=True):
        ranks = [_python_ranks(scores[start:end]) for scores in member_scores]
        for index in range(end - start):
            out.append(sum(w * r[index] for w, r in zip(weights, ranks, strict=True)) / sum(weights))
    return out


def _constant(values):
    return lambda images, **kwargs: torch.tensor(values, dtype=torch.float32)


def test_ensemble_rank_equals_plain_python_ties_included():
    first = [0.3, 0.3, 0.9, 0.1, 0.5, 0.5, 0.5]
    second = [1.0, 2.0, 2.0, float("nan"), 7.0, 3.0, 7.0]
    third = [5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0]
    groups = [0, 3, 7]
    images = torch.zeros(7, 3, 4, 4)
    for weights in (None, [1.0, 2.0, 0.5]):
        ensemble = Ensemble([_constant(first), _constant(second), _constant(third)], method="rank", weights=weights)
        got = ensemble(images, offsets=torch.tensor(groups))
        expected = _python_ensemble([first, second, third], groups, weights or [1.0, 1.0, 1.0])
        assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # without offsets the whole batch is one group
    got = Ensemble([_constant(first), _constant(third)])(images)
    assert got.tolist() == pytest.approx(_python_ensemble([first, third], [0, 7], [1.0, 1.0]), abs=1e-6)


def test_ensemble_zscore_and_mean():
    first, second = [1.0, 2.0, 3.0, 10.0, 10.0], [0.0, 4.0, 2.0, -1.0, 3.0]
    groups = torch.tensor([0, 3, 5])
    images = torch.zeros(5, 3, 2, 2)
    z = Ensemble([_constant(first), _constant(second)], method="zscore")(images, offsets=groups)

    def standard(values):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [0.0 if std == 0 else (v - mean) / std for v in values]

    expected = [(a + b) / 2 for a, b in zip(standard(first[:3]) + standard(first[3:]),
                                            standard(second[:3]) + standard(second[3:]), strict=True)]
    assert z.tolist() == pytest.approx(expected, abs=1e-5)
    mean = Ensemble([_constant(first), _constant(second)], method="mean", weights=[3.0, 1.0])
    assert not mean.groupwise and Ensemble([_constant(first)]).groupwise
    assert mean(images).tolist() == pytest.approx([(3 * a + b) / 4 for a, b in zip(first, second, strict=True)])
    ignored = Ensemble([_constant(first), _constant([float("nan")] * 5)], method="mean", weights=[1.0, 0.0])
    assert ignored(images).tolist() == pytest.approx(first), "a weight-0 verifier's NaN never reaches the mean"


def test_ensemble_cost_and_arguments_reach_every_member():
    seen = []

    def labelled(images, prompts):
        seen.append(list(prompts))
        return images.mean(dim=(1, 2, 3))

    metered = Metered(lambda images, prompts: -images.mean(dim=(1, 2, 3)))
    ensemble = Ensemble([labelled, metered])
    ensemble(torch.rand(4, 3, 2, 2), prompts=["a"] * 4, offsets=torch.tensor([0, 2, 4]))
    ensemble(torch.rand(2, 3, 2, 2), prompts=["b"] * 2)
    assert seen == [["a"] * 4, ["b"] * 2]
    assert ensemble.verifiers[1] is metered and isinstance(ensemble.verifiers[0], Metered)
    assert metered.cost.calls == 2 and metered.cost.images == 6
    assert ensemble.cost.calls == 4 and ensemble.cost.images == 12
    assert ensemble.cost == ensemble.verifiers[0].cost + metered.cost
    ensemble.reset_cost()
    assert ensemble.cost == VerifierCost()


def test_ensemble_bad_input():
    images = torch.zeros(3, 3, 2, 2)
    ok = _constant([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="verifiers is empty"):
        Ensemble([])
    with pytest.raises(TypeError, match="verifiers must be a sequence"):
        Ensemble(ok)
    with pytest.raises(TypeError, match=r"verifiers\[1\] must be callable"):
        Ensemble([ok, "clip"])
    with pytest.raises(ValueError, match="method must be one of"):
        Ensemble([ok], method="borda")
    with pytest.raises(TypeError, match="unexpected keyword argument 'how'"):
        Ensemble([ok], how="rank")  # the project's word is method=, and no alias
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2 verifiers"):
        Ensemble([ok, ok], weights=[1.0])
    with pytest.raises(ValueError, match=r"weights\[0\] must be >= 0"):
        Ensemble([ok, ok], weights=[-1.0, 1.0])
    with pytest.raises(ValueError, match="weights must not all be zero"):
        Ensemble([ok, ok], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"offsets: group 1 is empty"):
        Ensemble([ok])(images, offsets=torch.tensor([0, 3, 3]))
    with pytest.raises(ValueError, match=r"offsets must start at 0 and end at the number of images \(3\)"):
        Ensemble([ok])(images, offsets=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"verifiers\[1\] must return \[B=3\] scores, got \[2\]"):
        Ensemble([ok, _constant([1.0, 2.0])])(images)
    with pytest.raises(ValueError, match=r"scores must be \[V=2, N\]"):
        Ensemble([ok, ok]).combine(torch.zeros(3, 4))


# -- cost in the search results -------------------------------------------------------------------------------------


def _mixture_search(verifier, **options):
    mixture = gmm.rare_mode_mixture(2)
    return random_search(mixture.flow_model(), verifier, FlowSampler(4), (2,), num_candidates=5, num_prompts=3,
                         seed=0, progress=False, **options)


def test_noise_searches_report_the_verifiers_cost():
    plain = gmm.ModeLogDensity(gmm.rare_mode_mixture(2))
    assert _mixture_search(plain).verifier_cost is None, "a verifier that reports no cost gets None"
    metered = Metered(plain)
    metered(torch.zeros(2, 2))  # spent before the search: not the search's
    result = _mixture_search(metered, batch_size=4)
    cost = result.verifier_cost
    assert cost.images == result.verifier_calls == 15 and cost.calls == 4 and cost.seconds > 0
    assert "verifier_cost=VerifierCost(calls=4" in repr(result)


def test_a_rank_ensemble_ranks_within_each_prompt_in_the_noise_searches():
    mixture = gmm.rare_mode_mixture(2)
    density = gmm.ModeLogDensity(mixture)

    def spread(x0):
        return x0.norm(dim=-1)

    # the same seed makes the same candidates: score them with each member alone, then with the ensemble
    first = _mixture_search(density).scores
    second = _mixture_search(spread).scores
    ensemble = Ensemble([density, spread], method="rank")
    result = _mixture_search(ensemble, batch_size=2)  # scored in one call whatever batch_size says
    expected = _python_ensemble([first.flatten().tolist(), second.flatten().tolist()], [0, 5, 10, 15], [1.0, 1.0])
    assert result.scores.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert ensemble.cost.calls == 2 and ensemble.cost.images == 30
    with pytest.raises(ValueError, match="zero-order search compares scores across calls"):
        zero_order_search(mixture.flow_model(), ensemble, FlowSampler(4), (2,), iterations=1, seed=0, progress=False)


# -- through a diffusers pipeline -----------------------------------------------------------------------------------

SLOT_PROMPTS = ["a red fox", "a blue car"]


def test_search_pipeline_with_clip_score(kandinsky, clip):  # noqa: F811 - the imported fixture
    model, processor = clip
    verifier = CLIPScore(model, processor)
    result = search_pipeline(kandinsky, verifier, RandomSearch(num_candidates=3), seed=1, progress=False,
                             verifier_kwargs={"prompts": SLOT_PROMPTS}, output_type="np", **_request())
    assert result.sample.shape == (2, 16, 16, 3) and result.scores.shape == (2, 3)
    torch.testing.assert_close(result.score, result.scores.max(dim=1).values)
    torch.testing.assert_close(verifier(result.sample, SLOT_PROMPTS), result.score, atol=1e-5, rtol=0)
    cost = result.verifier_cost
    assert (cost.calls, cost.images) == (3, 6) and result.verifier_calls == 6 and result.nfe == 3 * STEPS


def test_search_pipeline_with_an_ensemble(kandinsky, clip):  # noqa: F811 - the imported fixture
    model, processor = clip
    clip_score = CLIPScore(model, processor)
    aesthetic = AestheticScore(model, _published_layout(8), processor=processor)
    request = dict(seed=1, progress=False, verifier_kwargs={"prompts": SLOT_PROMPTS}, output_type="np")
    search = RandomSearch(num_candidates=4)
    # random search: each slot's 4 candidates (made by 4 pipeline calls) are ranked together at the end
    alone = [search_pipeline(kandinsky, member, search, **request, **_request()).scores
             for member in (clip_score, aesthetic)]
    ensemble = Ensemble([clip_score, aesthetic], method="rank")
    result = search_pipeline(kandinsky, ensemble, search, **request, **_request())
    expected = _python_ensemble([alone[0].flatten().tolist(), alone[1].flatten().tolist()], [0, 4, 8], [1.0, 1.0])
    assert result.scores.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert result.score.tolist() == pytest.approx(result.scores.max(dim=1).values.tolist())
    assert [entry["best_score"].tolist() for entry in result.history][-1] == result.score.tolist()
    winners = result.scores.argmax(dim=1)
    assert result.sample.shape == (2, 16, 16, 3)
    torch.testing.assert_close(clip_score(result.sample, SLOT_PROMPTS),
                               alone[0][torch.arange(2), winners], atol=1e-5, rtol=0)
    assert (result.verifier_cost.calls, result.verifier_cost.images) == (8, 16), "both members, 4 calls of 2 images"
    # FK steering: the particles of a slot are ranked against each other at every scoring step
    def to_images(latents):  # the np output's images: [0, 1], channels last (Kandinsky's "pt" is the raw decode)
        decoded = kandinsky.movq.decode(latents, force_not_quantize=True).sample
        return (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    fk = search_pipeline(kandinsky, ensemble, FKSteering(num_particles=3, resample_every=2), decode=to_images,
                         **request, **_request())
    assert fk.sample.shape == (2, 16, 16, 3) and fk.scores.shape == (2, 3)
    # mean ranks within each slot's 3 particles: from 1 to 3, summing to 1 + 2 + 3
    assert fk.scores.sum(dim=1).tolist() == pytest.approx([6.0, 6.0]) and 1 <= fk.scores.min() <= fk.scores.max() <= 3
    assert fk.verifier_cost.images == 2 * fk.verifier_calls
    with pytest.raises(ValueError, match="zero-order search through a pipeline compares scores across calls"):
        search_pipeline(kandinsky, ensemble, ZeroOrderSearch(iterations=1), **request, **_request())
    mean = Ensemble([clip_score, aesthetic], method="mean", weights=[1.0, 0.1])
    zero = search_pipeline(kandinsky, mean, ZeroOrderSearch(num_neighbors=1, iterations=1), **request, **_request())
    assert zero.scores.shape == (2, 2) and zero.verifier_cost.calls == 4
