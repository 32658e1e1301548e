"""The embedded digits model: training, cache, shapes, classifier accuracy and conditional samples."""

import dataclasses

import pytest
import torch

pytest.importorskip("sklearn")

from fastsearch.diffusion import FlowSampler  # noqa: E402
from fastsearch.models import digits  # noqa: E402

TINY = digits.QUICK_CONFIG


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def models(cache):
    return digits.load_digits_models(TINY, cache=cache, progress=False)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)


def test_second_load_reads_the_cache(models, cache, monkeypatch):
    assert not models.from_cache
    assert (cache / f"digits-{digits.cache_key(TINY)}.pt").is_file()

    def no_training(*args):
        raise AssertionError("trained although the cache holds the models")

    monkeypatch.setattr(digits, "_train_velocity", no_training)
    monkeypatch.setattr(digits, "_train_classifier", no_training)
    again = digits.load_digits_models(TINY, cache=cache, progress=False)
    assert again.from_cache
    assert _states_equal(again.velocity_net, models.velocity_net)
    assert _states_equal(again.classifier_net, models.classifier_net)
    monkeypatch.setenv("FASTSEARCH_CACHE", str(cache))
    assert digits.cache_dir() == cache
    assert digits.load_digits_models(TINY, progress=False).from_cache


def test_training_is_deterministic_and_leaves_the_global_rng_alone(models, tmp_path):
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    retrained = digits.load_digits_models(TINY, cache=tmp_path, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    assert not retrained.from_cache
    assert _states_equal(retrained.velocity_net, models.velocity_net)
    assert _states_equal(retrained.classifier_net, models.classifier_net)


def test_corrupt_and_stale_caches_are_retrained(models, cache, tmp_path):
    path = tmp_path / f"digits-{digits.cache_key(TINY)}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable digits cache"):
        fresh = digits.load_digits_models(TINY, cache=tmp_path, progress=False)
    assert not fresh.from_cache and _states_equal(fresh.velocity_net, models.velocity_net)
    assert digits.load_digits_models(TINY, cache=tmp_path, progress=False).from_cache
    # a file written for another config or code version, under this name
    stale = torch.load(path, weights_only=True)
    stale["key"] = "0" * 20
    torch.save(stale, path)
    with pytest.warns(UserWarning, match="is not"):
        assert not digits.load_digits_models(TINY, cache=tmp_path, progress=False).from_cache
    other = dataclasses.replace(TINY, denoiser_steps=TINY.denoiser_steps + 1)
    assert digits.cache_key(other) != digits.cache_key(TINY)


def test_shapes_and_scores(models):
    x = torch.randn(5, 1, 8, 8)
    label = torch.tensor([0, 3, 3, 7, 9])
    for guidance in (0.0, 0.4, 1.0):
        velocity = models.model(guidance=guidance)(x, torch.rand(5), label=label)
        assert velocity.shape == x.shape and velocity.dtype == torch.float32
    sigma = torch.full((5,), 0.6)
    v_uncond = models.model(guidance=0.0)(x, sigma, label=label)
    v_cond = models.model(guidance=1.0)(x, sigma, label=label)
    torch.testing.assert_close(models.model(guidance=0.4)(x, sigma, label=label), v_uncond + 0.4 * (v_cond - v_uncond))
    assert not torch.allclose(v_uncond, v_cond), "the label changes the velocity"
    log_prob = models.verifier()(x, label=label)
    prob = models.verifier(output="prob")(x, label=label)
    assert log_prob.shape == prob.shape == (5,)
    assert bool((log_prob <= 0).all()) and bool(((prob >= 0) & (prob <= 1)).all())
    torch.testing.assert_close(prob, log_prob.exp())
    torch.testing.assert_close(models.verifier()(x, label=3), models.verifier()(x, label=torch.full((5,), 3)))
    assert models.predict(x).shape == (5,)


def test_bad_input(models):
    model, verifier = models.model(), models.verifier()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="label values must be digits"):
        verifier(x, label=torch.tensor([1, 10]))
    with pytest.raises(TypeError, match="label must hold integers"):
        model(x, torch.rand(2), label=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1 or B=2 values"):
        verifier(x, label=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, 1, 8, 8\]"):
        verifier(torch.randn(2, 64), label=1)
    with pytest.raises(ValueError, match="guidance must be a finite float"):
        models.model(guidance=float("nan"))
    with pytest.raises(ValueError, match="output must be"):
        models.verifier(output="logits")
    with pytest.raises(TypeError, match="DigitsConfig"):
        digits.load_digits_models({"hidden": 8})
    with pytest.raises(ValueError, match="split must be"):
        digits.digits_data("validation")


def test_classifier_is_accurate_on_held_out_digits(models):
    train_images, train_labels = digits.digits_data("train", config=TINY)
    images, labels = digits.digits_data("test", config=TINY)
    assert images.shape[1:] == (1, 8, 8) and len(train_labels) + len(labels) == 1797
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    accuracy = (models.predict(images) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_samples_show_their_label_more_often_than_chance(models):
    labels = torch.arange(10).repeat(20)
    noise = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = FlowSampler(10)
    accuracy = {}
    for guidance in (0.0, 1.0):
        out = sampler.sample(models.model(guidance=guidance), noise, label=labels)
        assert out.nfe == 200 * 10
        accuracy[guidance] = (models.predict(out.sample) == labels).float().mean().item()
    assert accuracy[1.0] > 0.5, accuracy
    assert accuracy[0.0] < accuracy[1.0] - 0.2, accuracy
