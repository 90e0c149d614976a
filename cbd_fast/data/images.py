"""Image decoding, resizing and CLIP normalisation.

Images travel through the data layer as ``uint8`` tensors ``[3, S, S]`` (S = image_size) and are turned into
normalised floats only when an item is read, so that a held dataset costs one byte per value.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

# The statistics CLIP's preprocessing uses; the towers are CLIP-style, so inputs are normalised the same way.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the central ``size × size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    # round() and max(…, size) keep the resized short side exactly ``size`` despite float error
    new_width = max(size, round(width * scale))
    new_height = max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


class BadImageError(InputError, OSError):
    """An image file that exists but cannot be decoded (not an image, truncated, unreadable)."""


@contextlib.contextmanager
def _refusing_decompression_bombs():
    """PIL raises DecompressionBombError for images of more than twice ``Image.MAX_IMAGE_PIXELS`` pixels, but only
    warns (DecompressionBombWarning) between once and twice that, and then decodes them in full: within this
    context the warning is raised as an error too, so that every image over the limit is a bad image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode an image file to a ``uint8`` tensor ``[3, size, size]`` (RGB, resized and centre-cropped).

    Raises ``FileNotFoundError`` or :class:`BadImageError`, both naming ``path``.
    """
    try:
        with _refusing_decompression_bombs(), Image.open(path) as image:
            rgb = resize_center_crop(image.convert("RGB"), size)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as exc:  # any failure to decode, e.g. PIL's DecompressionBombError/Warning, which are no OSError
        raise BadImageError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc
    array = np.asarray(rgb, dtype=np.uint8)  # [size, size, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image (missing, not an image, truncated…), or None when it decodes.

    ``verify()`` checks the structure, then a full decode (in JPEG draft mode: at reduced scale, still reading
    every byte) catches truncated files, which ``verify()`` alone lets through for JPEG. Images with more
    pixels than ``Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb; PIL itself only warns up to twice
    that) are rejected from their header.
    """
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with _refusing_decompression_bombs():
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:  # verify() leaves the image unusable: reopen to decode
                image.draft("RGB", (64, 64))
                image.load()
    except Exception as exc:  # PIL raises many types for damaged files (OSError, SyntaxError, DecompressionBomb...)
        return f"{type(exc).__name__}: {exc}"
    return None


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a ``uint8`` batch ``[N, 3, H, W]`` to ``[N, 3, size, size]`` (shorter side, then centre crop)."""
    _, _, height, width = images.shape
    if height == size and width == size:
        return images
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    resized = torch.nn.functional.interpolate(images.float(), size=(new_height, new_width), mode="bilinear",
                                              antialias=True, align_corners=False)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    resized = resized[:, :, top:top + size, left:left + size]
    return resized.round().clamp_(0, 255).to(torch.uint8)


# (x / 255 - mean) / std  ==  x · scale + shift: two in-place passes over a fresh float copy per item read
_SCALE = (1.0 / (255.0 * torch.tensor(CLIP_STD, dtype=torch.float64))).to(torch.float32).view(3, 1, 1)
_SHIFT = (-torch.tensor(CLIP_MEAN, dtype=torch.float64) / torch.tensor(CLIP_STD, dtype=torch.float64)
          ).to(torch.float32).view(3, 1, 1)


def normalize_uint8(image: torch.Tensor) -> torch.Tensor:
    """``uint8 [3, H, W]`` (or ``[N, 3, H, W]``) → ``float32`` of the same shape: scaled to [0, 1], then
    normalised with CLIP mean/std."""
    # copy=True: the in-place ops below must never write into a caller's (already float) tensor
    return image.to(torch.float32, copy=True).mul_(_SCALE).add_(_SHIFT)


# ------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augment:
    """CLIP-style train augmentation: a random resized crop, then an optional horizontal flip.

    The crop covers a fraction in ``crop_scale`` of the image's area with a width/height ratio in ``crop_ratio``
    (log-uniform), and is resized back to the image size.
    """

    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    flip: bool = False

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {list(self.crop_scale)}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {list(self.crop_ratio)}")


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def crop_box(height: int, width: int, augment: Augment, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random resized crop (torchvision's sampling: 10 tries, then
    the largest central crop with a ratio in range)."""
    area = height * width
    log_lo, log_hi = math.log(augment.crop_ratio[0]), math.log(augment.crop_ratio[1])
    for _ in range(10):
        target = area * _uniform(*augment.crop_scale, generator)
        ratio = math.exp(_uniform(log_lo, log_hi, generator))
        crop_width = round(math.sqrt(target * ratio))
        crop_height = round(math.sqrt(target / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
            return top, left, crop_height, crop_width
    ratio = width / height
    if ratio < augment.crop_ratio[0]:
        crop_width, crop_height = width, round(width / augment.crop_ratio[0])
    elif ratio > augment.crop_ratio[1]:
        crop_height, crop_width = height, round(height * augment.crop_ratio[1])
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def augment_image(image: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """``uint8 [3, S, S]`` → ``float32 [3, S, S]`` (values in [0, 255], not normalised): a random resized crop
    (bilinear, back to S × S), then a horizontal flip with probability 1/2 when ``augment.flip``.

    Every random draw comes from ``generator``, so the result is a function of the generator's seed."""
    _, height, width = image.shape
    top, left, crop_height, crop_width = crop_box(height, width, augment, generator)
    out = image[:, top:top + crop_height, left:left + crop_width].to(torch.float32)
    if (crop_height, crop_width) != (height, width):
        out = torch.nn.functional.interpolate(out[None], size=(height, width), mode="bilinear",
                                              antialias=True, align_corners=False)[0].clamp_(0, 255)
    if augment.flip and float(torch.rand((), generator=generator)) < 0.5:
        out = out.flip(-1)
    return out
