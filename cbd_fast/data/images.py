"""Image decoding, resizing and CLIP normalisation.

Images travel through the data layer as ``uint8`` tensors ``[3, S, S]`` (S = image_size) and are turned into
normalised floats only when an item is read, so that a held dataset costs one byte per value.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode an image file to a ``uint8`` tensor ``[3, size, size]`` (RGB, resized and centre-cropped)."""
    try:
        with Image.open(path) as image:
            rgb = resize_center_crop(image.convert("RGB"), size)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    array = np.asarray(rgb, dtype=np.uint8)  # [size, size, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


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
