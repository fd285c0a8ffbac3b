"""Image augmentation and normalisation with PIL and NumPy only (no torchvision dependency).

Crops are decided on the encoded image's header size and, for JPEGs much larger than the output, decoded
at a reduced scale (`Image.draft`, DCT scaling), which is the main CPU cost of web-scale image loading.
Crop and resize happen in one `resize(box=...)` call so no intermediate image is materialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def _draft_for(img: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple[float, ...]:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the crop still covers `size` pixels; rescale box."""
    if img.format != "JPEG":
        return box
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    factor = min(crop_w, crop_h) / size
    if factor < 2:
        return box
    full_w, full_h = img.size
    img.draft("RGB", (math.ceil(full_w / factor), math.ceil(full_h / factor)))
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _resize_box(img: Image.Image, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    box = _draft_for(img, box, size)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # palette / alpha / CMYK: resampling needs a plain colour mode
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return out if out.mode == "RGB" else out.convert("RGB")


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Inception-style crop: random area fraction in `scale` and aspect ratio in `ratio`, resized to size^2.

    Follows the usual 10-attempt scheme and falls back to the largest centred crop with a clamped aspect
    ratio. All randomness comes from `rng`, which is required (no hidden global RNG) so a sample's crop is
    reproducible from its key.
    """
    if rng is None:
        raise TypeError("random_resized_crop needs an explicit numpy Generator `rng` (reproducible crops)")
    width, height = img.size
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize_box(img, size, (left, top, left + w, top + h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return _resize_box(img, size, (left, top, left + w, top + h))


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Evaluation view: shorter side resized to `size`, then the centred size x size square.

    Done as one resize of the centred square box, which is the same geometry without an intermediate.
    """
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return _resize_box(img, size, (left, top, left + side, top + side))


def to_normalized_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> float32 [3, H, W], scaled to [0, 1] then normalised per channel."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    mean_a = np.asarray(mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    arr = (arr - mean_a) * inv_std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
