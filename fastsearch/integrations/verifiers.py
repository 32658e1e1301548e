"""Image verifiers on transformers' CLIP: :class:`CLIPScore` and the LAION :class:`AestheticScore`.

Images are prepared on tensors, batched, on the model's device (:func:`fastsearch.verifiers.resize_crop_normalize`
with the sizes, mean and std of the model's image processor), so that a pipeline's decoded images never leave the
GPU. Text goes through the processor's tokenizer. Embeddings come from the model's own towers and projections
(``vision_model`` + ``visual_projection``, ``text_model`` + ``text_projection``), as ``get_image_features`` /
``get_text_features`` compute them, and the cosine of each image with its prompt is one
:func:`fastsearch.cosine_scores` over ragged groups (one text per prompt, many images per prompt).

This module works on transformers models through their attributes only and never imports ``transformers``;
building the models needs the ``transformers`` extra (``pip install 'fastsearch[transformers]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

import fastsearch
from fastsearch.checks import check_int, check_optional_int
from fastsearch.verifiers import AestheticMLP, MeteredVerifier, as_unit_rgb, load_aesthetic_mlp, resize_crop_normalize
from fastsearch.verifiers.ensemble import check_offsets
from fastsearch.verifiers.images import check_image_range

# OpenAI CLIP's pixel statistics (the image processor's image_mean / image_std of every released checkpoint)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _parameter(model) -> torch.Tensor:
    return next(model.parameters())


def _size_pair(value, name: str) -> tuple[int, int] | int:
    """An image processor's ``size`` / ``crop_size``: {"shortest_edge": s} -> s, {"height", "width"} -> (h, w)."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
    size = getattr(value, "shortest_edge", None)
    if size is not None:
        return int(size)
    height, width = getattr(value, "height", None), getattr(value, "width", None)
    if height is not None and width is not None:
        return int(height), int(width)
    raise ValueError(f"processor's {name} must be an int or a dict with shortest_edge or height and width, got "
                     f"{value!r}")


class CLIPImages:
    """Image embeddings of a CLIP vision tower with projection, from any images :func:`as_unit_rgb` takes.

    Args:
        model: a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (``vision_model`` +
            ``visual_projection``).
        processor: its ``CLIPProcessor`` or ``CLIPImageProcessor`` (sizes, mean, std); None: the model's
            ``image_size`` and OpenAI CLIP's statistics.
        image_range: the value range of float image tensors, (0, 1) or (-1, 1).
        batch_size: images per forward pass (None: all at once).
    """

    def __init__(self, model, processor=None, *, image_range=(0.0, 1.0), batch_size: int | None = None):
        if not isinstance(model, nn.Module) or not hasattr(model, "vision_model") \
                or not hasattr(model, "visual_projection"):
            raise TypeError(f"model must be a transformers CLIPModel or CLIPVisionModelWithProjection, got "
                            f"{type(model).__name__}")
        self.model = model.eval()
        self.image_range = check_image_range(image_range)
        self.batch_size = check_optional_int("batch_size", batch_size)
        images = getattr(processor, "image_processor", processor)
        if images is None:
            side = check_int("model.config.vision_config.image_size", self._vision_config().image_size)
            self.resize, self.crop, self.mean, self.std = side, (side, side), CLIP_MEAN, CLIP_STD
            return
        if not hasattr(images, "image_mean") or not hasattr(images, "crop_size"):
            raise TypeError(f"processor must be a CLIPProcessor or CLIPImageProcessor, got {type(processor).__name__}")
        self.resize = _size_pair(images.size, "size")
        crop = _size_pair(images.crop_size, "crop_size") if getattr(images, "do_center_crop", True) else None
        if crop is None:
            crop = self.resize if isinstance(self.resize, tuple) else (self.resize, self.resize)
        self.crop = crop if isinstance(crop, tuple) else (crop, crop)
        self.mean, self.std = tuple(images.image_mean), tuple(images.image_std)

    def _vision_config(self):
        config = self.model.config
        return getattr(config, "vision_config", config)

    def pixel_values(self, images) -> torch.Tensor:
        """The model's input from ``images``: [B, 3, crop_h, crop_w] in the model's dtype, on its device."""
        weight = _parameter(self.model)
        pixels = as_unit_rgb(images, image_range=self.image_range, device=weight.device)
        return resize_crop_normalize(pixels, resize=self.resize, crop=self.crop, mean=self.mean, std=self.std,
                                     dtype=weight.dtype)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """Projected image embeddings: [B, P] float32 (not normalised)."""
        pixels = self.pixel_values(images)
        step = self.batch_size or pixels.shape[0]
        chunks = []
        for begin in range(0, pixels.shape[0], step):
            pooled = self.model.vision_model(pixel_values=pixels[begin:begin + step]).pooler_output
            chunks.append(self.model.visual_projection(pooled).float())
        return torch.cat(chunks)


class CLIPScore(MeteredVerifier):
    """CLIPScore: the cosine of each image's CLIP embedding with its prompt's, higher is better.

    ``score = cos(E_image, E_text)``, or with ``scaled=True`` the usual CLIPScore scale ``100 * max(cos, 0)`` (as
    torchmetrics reports it; Hessel et al. 2021 use ``2.5 * max(cos, 0)``).

    Prompts and images (the ragged layout): ``prompts`` is one str for all images; or B strs, one per image (runs
    of equal consecutive prompts are encoded once: a search's candidates of a prompt are consecutive); or G strs
    with ``offsets`` [G + 1], prompt g owning images ``offsets[g]:offsets[g + 1]``. Each distinct text is encoded
    once and the cosines are one :func:`fastsearch.cosine_scores` call.

    Args:
        model: a transformers ``CLIPModel``.
        processor: its ``CLIPProcessor`` (the tokenizer, and the image processor's sizes, mean and std).
        scaled: return ``100 * max(cos, 0)`` instead of the cosine.
        image_range: the value range of float image tensors: (0, 1) (a pipeline's ``output_type="pt"``) or
            (-1, 1) (a VAE decode).
        batch_size: images per forward pass (None: all at once).

    Shapes:
        ``verifier(images, prompts, offsets=None) -> [B]`` float32 on the model's device, with images [B, 3, H, W]
        (or [B, H, W, 3], a numpy array, or a list of PIL images).

    Example:
        >>> from transformers import CLIPModel, CLIPProcessor
        >>> clip = CLIPScore(CLIPModel.from_pretrained("openai/clip-vit-large-patch14"),
        ...                  CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14"))
        >>> clip(images, ["a red fox", "a blue car"], offsets=torch.tensor([0, 4, 8]))   # [8]
    """

    def __init__(self, model, processor, *, scaled: bool = False, image_range=(0.0, 1.0),
                 batch_size: int | None = None):
        super().__init__()
        if not hasattr(model, "text_model") or not hasattr(model, "text_projection"):
            raise TypeError(f"model must be a transformers CLIPModel (with a text tower), got {type(model).__name__}")
        tokenizer = getattr(processor, "tokenizer", None)
        if not callable(tokenizer):
            raise TypeError(f"processor must be a CLIPProcessor (with a tokenizer), got {type(processor).__name__}")
        if not isinstance(scaled, bool):
            raise TypeError(f"scaled must be a bool, got {type(scaled).__name__}")
        self.images = CLIPImages(model, processor, image_range=image_range, batch_size=batch_size)
        self.model, self.tokenizer, self.scaled = model.eval(), tokenizer, scaled
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings of ``texts``: [len(texts), P] float32 (not normalised)."""
        weight = _parameter(self.model)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(weight.device),
                                       attention_mask=tokens["attention_mask"].to(weight.device)).pooler_output
        return self.model.text_projection(pooled).float()

    def groups(self, prompts, count: int, offsets) -> tuple[list[str], torch.Tensor]:
        """The distinct texts and int64 offsets [G + 1] over ``count`` images (see the class docstring)."""
        if isinstance(prompts, str):
            prompts = [prompts]
            if offsets is None:
                offsets = torch.tensor([0, count])
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        prompts = list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{index}] must be a str, got {type(prompt).__name__}")
        if offsets is not None:
            offsets = check_offsets(offsets, count)
            if len(prompts) != offsets.numel() - 1:
                raise ValueError(f"prompts has {len(prompts)} entries but offsets describe {offsets.numel() - 1} "
                                 "groups: give one prompt per group")
            return prompts, offsets
        if len(prompts) != count:
            raise ValueError(f"prompts has {len(prompts)} entries but there are {count} images: give one prompt per "
                             "image, or one per group with offsets [G + 1]")
        starts = [index for index in range(count) if index == 0 or prompts[index] != prompts[index - 1]]
        return [prompts[start] for start in starts], torch.tensor(starts + [count])

    def score(self, images, prompts: str | Sequence[str], *, offsets: torch.Tensor | None = None) -> torch.Tensor:
        image_features = self.images(images)
        texts, offsets = self.groups(prompts, image_features.shape[0], offsets)
        text_features = self.text_embeddings(texts)
        cosine = fastsearch.cosine_scores(image_features, text_features,
                                          offsets=offsets.to(device=image_features.device, dtype=torch.int64))
        return 100.0 * cosine.clamp(min=0.0) if self.scaled else cosine

    def __repr__(self) -> str:
        return f"CLIPScore({type(self.model).__name__}, scaled={self.scaled})"


class AestheticScore(MeteredVerifier):
    """The LAION aesthetic predictor: its MLP on the L2-normalised CLIP image embedding, about 1 (bad) to 10.

    The published predictor reads OpenAI CLIP ViT-L/14 embeddings (768 wide); the MLP's width must match the
    model's projection.

    Args:
        clip_model: a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection``.
        mlp: an :class:`~fastsearch.verifiers.AestheticMLP`, or the predictor's state dict (or ``.pth`` path) for
            :func:`~fastsearch.verifiers.load_aesthetic_mlp`; moved to the model's device, fp32, eval mode.
        processor: the model's ``CLIPProcessor`` / ``CLIPImageProcessor`` (None: the model's image size and OpenAI
            CLIP's statistics).
        image_range: the value range of float image tensors, (0, 1) or (-1, 1).
        batch_size: images per forward pass (None: all at once).

    Shapes:
        ``verifier(images, prompts=None) -> [B]`` float32; ``prompts`` is accepted and unused, so that the
        predictor shares an :class:`~fastsearch.verifiers.Ensemble`'s call with prompt-aware verifiers.

    Example:
        >>> from transformers import CLIPVisionModelWithProjection
        >>> aesthetic = AestheticScore(CLIPVisionModelWithProjection.from_pretrained("openai/clip-vit-large-patch14"),
        ...                            "sac+logos+ava1-l14-linearMSE.pth")
    """

    def __init__(self, clip_model, mlp, *, processor=None, image_range=(0.0, 1.0), batch_size: int | None = None):
        super().__init__()
        if not isinstance(mlp, nn.Module):
            mlp = load_aesthetic_mlp(mlp)
        if not isinstance(mlp, AestheticMLP):
            raise TypeError(f"mlp must be an AestheticMLP (or its state dict), got {type(mlp).__name__}")
        self.images = CLIPImages(clip_model, processor, image_range=image_range, batch_size=batch_size)
        width = clip_model.visual_projection.out_features
        if mlp.embed_dim != width:
            raise ValueError(f"mlp reads {mlp.embed_dim}-wide embeddings but clip_model projects to {width}")
        self.mlp = mlp.to(device=_parameter(clip_model).device, dtype=torch.float32).eval()

    @torch.no_grad()
    def score(self, images, prompts=None) -> torch.Tensor:
        embeddings = nn.functional.normalize(self.images(images), dim=-1)
        return self.mlp(embeddings)

    def __repr__(self) -> str:
        return f"AestheticScore({type(self.images.model).__name__}, embed_dim={self.mlp.embed_dim})"
