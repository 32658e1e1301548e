"""A small class-conditional flow model and a classifier on scikit-learn's 8x8 digits.

Everything here trains on one CPU core in well under a minute, from data that ships inside scikit-learn, so
image search runs anywhere with nothing downloaded:

- the *denoiser* is a rectified-flow velocity network (``x_s = (1 - s) x0 + s noise``,
  ``v = noise - x0``), class-conditional on the digit label and trained with label dropout, so the same
  network also predicts the unconditional velocity. :meth:`DigitsModels.model` wraps it in the denoiser
  protocol ``model(x, sigma, label=...) -> velocity`` with a classifier-free guidance weight; run it with
  :class:`fastsearch.diffusion.FlowSampler`.
- the *verifier* is a digit classifier: ``verifier(x0, label=...)`` is the log-probability (or the
  probability) that ``x0`` shows the requested digit.

A weak guidance weight (:data:`WEAK_GUIDANCE`) makes a model that draws the requested digit only part of
the time, which leaves room for search to help. Both networks are trained on first use, deterministically
from the config's seed, and cached under ``$FASTSEARCH_CACHE`` (default ``~/.cache/fastsearch``) in a file
keyed by a hash of the training config and of this module's source; an unreadable or mismatched cache file
is retrained.

Images are float32 tensors of shape [B, 1, 8, 8] with pixel values in [-1, 1] (scikit-learn's 0..16 ink
levels mapped linearly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
# The guidance weight at which the default model draws the requested digit roughly 40% of the time (as
# judged by the classifier), against ~98% at guidance 1: a model that search can visibly improve.
WEAK_GUIDANCE = 0.3
_NULL_LABEL = NUM_CLASSES  # the label-dropout token: "no label", i.e. the unconditional model
_INK_LEVELS = 16.0


@dataclass(frozen=True)
class DigitsConfig:
    """How the two networks are trained; every field enters the cache key.

    Attributes:
        hidden: width of both networks' hidden layers.
        blocks: residual blocks of the velocity network.
        denoiser_steps, classifier_steps: optimiser steps of each network.
        batch_size: images per optimiser step.
        lr: peak learning rate (AdamW; one-cycle schedule for the velocity network).
        label_dropout: fraction of training images whose label is replaced by the null label, which
            teaches the velocity network the unconditional velocity too.
        classifier_noise: std of the Gaussian pixel noise added to the classifier's training images, so it
            also judges the imperfect images a sampler makes.
        test_fraction: fraction of the dataset held out (never trained on) for evaluation.
        seed: seed of the data split, initialisation and training noise.
    """

    hidden: int = 256
    blocks: int = 3
    denoiser_steps: int = 2000
    classifier_steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    label_dropout: float = 0.2
    classifier_noise: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0


# Trains in a second or two and still makes recognisable digits: for tests and the quick demo.
QUICK_CONFIG = DigitsConfig(hidden=64, blocks=2, denoiser_steps=300, classifier_steps=300, batch_size=128)


class VelocityNet(nn.Module):
    """Residual MLP predicting the rectified-flow velocity of an 8x8 digit at noise level sigma."""

    def __init__(self, hidden: int, blocks: int):
        super().__init__()
        pixels = math.prod(IMAGE_SHAPE)
        self.embed_pixels = nn.Linear(pixels, hidden)
        self.embed_sigma = nn.Linear(32, hidden)
        self.embed_label = nn.Embedding(NUM_CLASSES + 1, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, pixels))
        # Geometric frequencies: sigma in [0, 1] is resolved from coarse to ~1/200.
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(200.0), 16)), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The velocity of samples ``x`` at noise levels ``sigma``.

        Args:
            x: [B, 1, 8, 8] float32.
            sigma: [B] float32 in [0, 1].
            label: [B] int64 in [0, 10] (10: no label, the unconditional velocity).

        Returns:
            [B, 1, 8, 8] float32.
        """
        phase = sigma[:, None] * self.frequencies
        h = self.embed_pixels(x.flatten(1)) + self.embed_sigma(torch.cat([phase.sin(), phase.cos()], 1))
        h = h + self.embed_label(label)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).view(x.shape)


class ClassifierNet(nn.Module):
    """MLP classifier of 8x8 digits: [B, 1, 8, 8] float32 -> logits [B, 10] float32."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(math.prod(IMAGE_SHAPE), hidden), nn.SiLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _labels(label, batch: int, device: torch.device) -> torch.Tensor:
    """``label`` (an int, a 0-d tensor, or [1] or [B] integer tensor) as an int64 tensor of shape [B]."""
    if isinstance(label, bool | float | str):
        raise TypeError(f"label must be an int or an integer tensor, got {type(label).__name__}")
    label = torch.as_tensor(label, device=device)
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise TypeError(f"label must hold integers, got dtype {label.dtype}")
    if label.dim() > 1 or label.numel() not in (1, batch):
        raise ValueError(f"label must be an int or hold 1 or B={batch} values, got shape {list(label.shape)}")
    if bool(((label < 0) | (label >= NUM_CLASSES)).any()):
        raise ValueError(f"label values must be digits in [0, {NUM_CLASSES - 1}]")
    return label.to(torch.int64).reshape(-1).expand(batch)


def _check_images(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape [B, 1, 8, 8], got {list(x.shape)}")


class DigitsFlowModel:
    """The velocity network in the denoiser protocol, with classifier-free guidance.

    ``v = v_uncond + guidance (v_cond - v_uncond)``: 0 is the unconditional model (the label is ignored),
    1 the conditional one, values in between a weakly conditional one, above 1 amplified guidance. Both
    velocities come from one batched network call, and only the one needed is computed at 0 and 1. One
    call counts as one NFE per sample.
    """

    def __init__(self, net: VelocityNet, guidance: float = 1.0):
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite float, got {guidance}")
        self.net = net
        self.guidance = float(guidance)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma, *, label) -> torch.Tensor:
        """Velocity at noise level ``sigma``.

        Args:
            x: [B, 1, 8, 8] samples at ``sigma`` (computed in float32).
            sigma: float or [B] float tensor, the rectified-flow noise level in [0, 1].
            label: the requested digit: an int or an int64 tensor of shape [B] (or [1]).

        Returns:
            the velocity, [B, 1, 8, 8] float32.
        """
        _check_images(x, "x")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        wanted = _labels(label, batch, x.device)
        x = x.float()
        if self.guidance == 1.0:
            return self.net(x, sigma, wanted)
        unconditional = torch.full_like(wanted, _NULL_LABEL)
        if self.guidance == 0.0:
            return self.net(x, sigma, unconditional)
        both = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([unconditional, wanted]))
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)


class DigitsVerifier:
    """How sure the classifier is that an image shows the requested digit (higher is better).

    ``output="log_prob"`` scores ``log p(label | x0)`` (in (-inf, 0]); ``output="prob"`` scores
    ``p(label | x0)`` (in [0, 1]).
    """

    def __init__(self, net: ClassifierNet, output: str = "log_prob"):
        if output not in ("log_prob", "prob"):
            raise ValueError(f"output must be 'log_prob' or 'prob', got {output!r}")
        self.net = net
        self.output = output

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, *, label) -> torch.Tensor:
        """Score images for the requested digits.

        Args:
            x0: [B, 1, 8, 8] images (computed in float32).
            label: the requested digit: an int or an int64 tensor of shape [B] (or [1]).

        Returns:
            [B] float32 scores.
        """
        _check_images(x0, "x0")
        log_probs = self.net(x0.float()).log_softmax(dim=1)
        score = log_probs.gather(1, _labels(label, x0.shape[0], x0.device)[:, None]).squeeze(1)
        return score.exp() if self.output == "prob" else score


@dataclass(frozen=True)
class DigitsModels:
    """The trained networks and the callables built on them.

    Attributes:
        velocity_net: the flow network (``model(...)`` wraps it).
        classifier_net: the classifier (``verifier(...)`` wraps it).
        config: the training config they came from.
        from_cache: True when loaded from the cache, False when trained by this call.
    """

    velocity_net: VelocityNet
    classifier_net: ClassifierNet
    config: DigitsConfig
    from_cache: bool

    def model(self, *, guidance: float = 1.0) -> DigitsFlowModel:
        """The denoiser ``model(x, sigma, label=...) -> velocity`` at guidance weight ``guidance``."""
        return DigitsFlowModel(self.velocity_net, guidance)

    def verifier(self, *, output: str = "log_prob") -> DigitsVerifier:
        """The verifier ``verifier(x0, label=...) -> [B]``: ``"log_prob"`` or ``"prob"`` of the label."""
        return DigitsVerifier(self.classifier_net, output)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's digit for each image: [B, 1, 8, 8] float32 -> [B] int64."""
        _check_images(images, "images")
        return self.classifier_net(images.float()).argmax(dim=1)


def digits_data(split: str = "train", *, config: DigitsConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, split into a training and a held-out part by the config's seed.

    Args:
        split: ``"train"``, ``"test"`` (the held-out ``config.test_fraction``) or ``"all"``.
        config: gives the split's seed and size (default :class:`DigitsConfig`).

    Returns:
        ``(images, labels)``: [N, 1, 8, 8] float32 in [-1, 1] and [N] int64.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    config = config or DigitsConfig()
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) * (2.0 / _INK_LEVELS) - 1.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
    num_test = round(config.test_fraction * len(labels))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    return images[chosen], labels[chosen]


def _progress_steps(total: int, description: str, progress: bool):
    from tqdm.auto import trange

    return trange(total, desc=description, disable=not progress, leave=False)


def _train_velocity(images: torch.Tensor, labels: torch.Tensor, config: DigitsConfig, progress: bool) -> VelocityNet:
    net = VelocityNet(config.hidden, config.blocks)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.denoiser_steps)
    for _ in _progress_steps(config.denoiser_steps, "digits: training the flow model", progress):
        index = torch.randint(0, len(labels), (config.batch_size,))
        x0, label = images[index], labels[index].clone()
        label[torch.rand(config.batch_size) < config.label_dropout] = _NULL_LABEL
        noise = torch.randn_like(x0)
        sigma = torch.rand(config.batch_size)
        s = sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(net((1.0 - s) * x0 + s * noise, sigma, label), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


def _train_classifier(images: torch.Tensor, labels: torch.Tensor, config: DigitsConfig,
                      progress: bool) -> ClassifierNet:
    net = ClassifierNet(config.hidden)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-2)
    for _ in _progress_steps(config.classifier_steps, "digits: training the classifier", progress):
        index = torch.randint(0, len(labels), (config.batch_size,))
        x = images[index] + config.classifier_noise * torch.randn(config.batch_size, *IMAGE_SHAPE)
        loss = F.cross_entropy(net(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@contextlib.contextmanager
def one_thread():
    """Run torch's CPU ops on one thread inside the block (the previous count is restored after).

    Training runs this way: the float reductions are then the same on every machine (so the cached result
    does not depend on the core count), and for matrices this small, threading costs more than it gains; on
    a busy machine, several times more.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_dir() -> Path:
    """Where trained models are cached: ``$FASTSEARCH_CACHE``, else ``~/.cache/fastsearch``."""
    return Path(os.environ.get("FASTSEARCH_CACHE") or Path.home() / ".cache" / "fastsearch")


def cache_key(config: DigitsConfig) -> str:
    """Hash of the training config and of this module's source (the training code's version)."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:20]


def _read_cache(path: Path, key: str, config: DigitsConfig) -> DigitsModels | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["key"] != key:
            raise ValueError(f"cache key {state['key']!r} is not {key!r}")
        velocity, classifier = VelocityNet(config.hidden, config.blocks), ClassifierNet(config.hidden)
        velocity.load_state_dict(state["velocity_net"])
        classifier.load_state_dict(state["classifier_net"])
    # A cache file can be broken in more ways than torch.load names (truncated zip, wrong pickle,
    # missing or misshapen tensors); each one means the same thing: train again.
    except Exception as exc:
        warnings.warn(f"fastsearch: ignoring the unreadable digits cache {path} ({exc}); retraining", stacklevel=3)
        return None
    return DigitsModels(velocity.eval(), classifier.eval(), config, from_cache=True)


def load_digits_models(config: DigitsConfig | None = None, *, cache: str | os.PathLike | None = None,
                       progress: bool = True) -> DigitsModels:
    """The digits flow model and classifier: read from the cache, or trained (and cached) on first use.

    Training is deterministic for a config (seeded data order, initialisation and noise; torch's global
    random state is left as it was; it runs on one thread) and takes about ten seconds on a CPU for the default.

    Args:
        config: training config (default :class:`DigitsConfig`).
        cache: cache folder (default :func:`cache_dir`). The file is ``digits-<cache_key(config)>.pt``.
        progress: show tqdm bars while training.

    Returns:
        :class:`DigitsModels` (networks on the CPU, in eval mode).

    Example:
        >>> digits = load_digits_models()
        >>> model, verifier = digits.model(guidance=WEAK_GUIDANCE), digits.verifier()
        >>> x0 = FlowSampler(20).sample(model, torch.randn(10, 1, 8, 8), label=torch.arange(10))
        >>> verifier(x0, label=torch.arange(10))            # [10] log-probabilities
    """
    config = config or DigitsConfig()
    if not isinstance(config, DigitsConfig):
        raise TypeError(f"config must be a DigitsConfig, got {type(config).__name__}")
    key = cache_key(config)
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"digits-{key}.pt"
    cached = _read_cache(path, key, config)
    if cached is not None:
        return cached
    images, labels = digits_data("train", config=config)
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(config.seed)
        velocity = _train_velocity(images, labels, config, progress)
        classifier = _train_classifier(images, labels, config, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees a half-written file.
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"key": key, "velocity_net": velocity.state_dict(), "classifier_net": classifier.state_dict()},
               partial)
    os.replace(partial, path)
    return DigitsModels(velocity, classifier, config, from_cache=False)
