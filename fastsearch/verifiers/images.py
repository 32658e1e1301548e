"""Images as verifiers take them: checked, brought to RGB in [0, 1], resized, cropped and normalised on tensors.

A pipeline's decoder gives float tensors in [0, 1] (``output_type="pt"``) or [-1, 1] (a raw VAE decode), NCHW,
or NHWC numpy arrays (``output_type="np"``); users also have PIL images. :func:`as_unit_rgb` accepts all of them
and :func:`resize_crop_normalize` prepares them for a vision encoder in one batched pass on the encoder's device,
the way CLIP's image processor does it on PIL images (shortest side resized with bicubic antialiasing, centre
crop, per-channel mean / std). :func:`png_data_url` encodes one image for a chat endpoint.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastsearch.checks import check_float

# Decoders overshoot their range a little: values up to this fraction of the range's width beyond it are
# accepted (and clamped); anything further means the images are not in the declared range.
RANGE_SLACK = 0.05


def check_image_range(image_range, name: str = "image_range") -> tuple[float, float]:
    """``(low, high)`` with low < high: the value range of float images, e.g. (0, 1) or (-1, 1)."""
    if isinstance(image_range, str) or not isinstance(image_range, Sequence) or len(image_range) != 2:
        raise TypeError(f"{name} must be a pair (low, high), e.g. (0, 1) or (-1, 1), got {image_range!r}")
    low = check_float(f"{name}[0]", image_range[0])
    high = check_float(f"{name}[1]", image_range[1])
    if not low < high:
        raise ValueError(f"{name} must have low < high, got {image_range!r}")
    return low, high


def _is_pil(image) -> bool:
    return hasattr(image, "convert") and hasattr(image, "size") and hasattr(image, "mode")


def _channels_first(name: str, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] from [B, C, H, W] or [B, H, W, C] (C = 1 or 3), RGB (one channel repeated)."""
    if images.dim() != 4:
        raise ValueError(f"{name} must be a batch [B, 3, H, W] (or [B, H, W, 3]), got shape {list(images.shape)}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 3 (or 1) channels, as [B, 3, H, W] or [B, H, W, 3], got shape "
                         f"{list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one image")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} has an empty image dimension, shape {list(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _to_unit(name: str, images: torch.Tensor, image_range: tuple[float, float]) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (in image_range) or uint8, got {images.dtype}")
    images = images.float()
    low, high = image_range
    slack = RANGE_SLACK * (high - low)
    least, most = (float(value) for value in torch.aminmax(images))
    if not (least >= low - slack and most <= high + slack):  # NaN fails too
        hint = " (pipelines return [0, 1] with output_type='pt'; a raw VAE decode is [-1, 1])"
        raise ValueError(f"{name} has values in [{least:.3g}, {most:.3g}], outside image_range=({low:g}, {high:g})"
                         f"{hint}: pass the range the images are in")
    return ((images - low) / (high - low)).clamp(0.0, 1.0)


def as_unit_rgb(images, *, image_range=(0.0, 1.0), device=None, name: str = "images"
                ) -> torch.Tensor | list[torch.Tensor]:
    """Images as float32 RGB in [0, 1] on ``device``: one [B, 3, H, W] tensor, or a list of [3, H_i, W_i].

    Args:
        images: a float tensor in ``image_range`` or a uint8 tensor, [B, 3, H, W] or [B, H, W, 3] (one channel is
            repeated); a numpy array alike; or a sequence of PIL images, of [3, H, W] / [H, W, 3] tensors or arrays.
        image_range: ``(low, high)`` of float images: (0, 1) or (-1, 1); values more than 5% of the range's width
            outside it are an error, those within are clamped.
        device: where the result goes (None: where the images are; PIL images: the CPU).
        name: the argument's name in error messages.

    Returns:
        [B, 3, H, W] float32 when the images are one tensor or all the same size, else a list of [3, H, W].
    """
    image_range = check_image_range(image_range)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        return _to_unit(name, _channels_first(name, images.to(device) if device is not None else images),
                        image_range)
    if isinstance(images, str | bytes) or not isinstance(images, Sequence):
        raise TypeError(f"{name} must be a tensor [B, 3, H, W], a numpy array or a sequence of PIL images, got "
                        f"{type(images).__name__}")
    if not images:
        raise ValueError(f"{name} is empty: give at least one image")
    converted = []
    for index, image in enumerate(images):
        if _is_pil(image):
            image = torch.from_numpy(np.array(image.convert("RGB")))
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a PIL image, a tensor or a numpy array, got "
                            f"{type(image).__name__}")
        if image.dim() != 3:
            raise ValueError(f"{name}[{index}] must be one image [3, H, W] or [H, W, 3], got shape "
                             f"{list(image.shape)}")
        image = image.to(device) if device is not None else image
        converted.append(_to_unit(f"{name}[{index}]", _channels_first(f"{name}[{index}]", image[None]),
                                  image_range)[0])
    if all(image.shape == converted[0].shape for image in converted):
        return torch.stack(converted)
    return converted


def resize_crop_normalize(images: torch.Tensor | list[torch.Tensor], *, resize: int | tuple[int, int],
                          crop: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vision-encoder input from RGB images in [0, 1]: resized (bicubic, antialiased, skipped where the size is
    already right), centre-cropped to ``crop``, ``(x - mean) / std`` per channel.

    Args:
        images: [B, 3, H, W] float32 in [0, 1], or a list of [3, H_i, W_i] (each resized on its own).
        resize: an int: the shortest side after resizing, keeping the aspect ratio (CLIP: 224); or (height,
            width) to resize to exactly.
        crop: (height, width) of the centre crop (CLIP: (224, 224)).
        mean, std: 3 values each.
        dtype: the result's dtype (the encoder's).

    Returns:
        [B, 3, crop_h, crop_w] in ``dtype``, on the images' device.
    """
    if isinstance(images, list):
        return torch.cat([resize_crop_normalize(image[None], resize=resize, crop=crop, mean=mean, std=std,
                                                dtype=dtype) for image in images])
    height, width = images.shape[-2:]
    if isinstance(resize, int):  # the long side truncated, as transformers' image processors compute it
        size = (resize, max(1, int(resize * width / height))) if height <= width else \
            (max(1, int(resize * height / width)), resize)
    else:
        size = tuple(resize)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    crop_h, crop_w = crop
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        images = F.pad(images, (max(0, (crop_w - width) // 2), max(0, crop_w - width - (crop_w - width) // 2),
                                max(0, (crop_h - height) // 2), max(0, crop_h - height - (crop_h - height) // 2)))
        height, width = images.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    images = images[..., top:top + crop_h, left:left + crop_w]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return ((images - mean_t) / std_t).to(dtype)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(image: torch.Tensor) -> bytes:
    """A PNG file (8-bit RGB) of one image [3, H, W] float in [0, 1]."""
    pixels = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + _png_chunk(b"IEND", b""))


def png_data_url(image: torch.Tensor) -> str:
    """``data:image/png;base64,...`` of one image [3, H, W] float in [0, 1] (for an ``image_url`` content part)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
