"""Image augmentation and normalisation with PIL, NumPy and torch (no torchvision dependency).

Crops are decided on the encoded image's header size and, for JPEGs much larger than the output, decoded
at a reduced scale (`Image.draft`, DCT scaling: the decoder does less work and the resize has fewer
pixels to filter). Two ways to produce the crop, with the same crop box from the same RNG draws:

* `random_resized_crop` / `center_crop_resize` return PIL images: crop and resize in one
  `resize(box=...)` call (fractional box, no intermediate image);
* the `*_array` versions, which the training and eval streams use, crop only the needed pixels (before
  any colour conversion) and resize with torch's vectorised uint8 antialiased bicubic kernel -- the same
  filter as PIL's bicubic (mean absolute difference ~0.1 grey level, box rounded to whole pixels as
  torchvision does) at about a sixth of PIL's resize cost, the largest per-sample CPU cost after decoding.

Every crop is of the image as displayed: the EXIF orientation (`decode.exif_orientation`, read from the
header) decides the displayed size the box is drawn on, the box is mapped onto the stored pixels, and only
the cropped region is turned upright (`Image.transpose`, exact), so a phone photo trains as it is shown,
with the crop statistics of the displayed picture, at the cost of transposing the crop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import TRANSPOSES, displayed_size, exif_orientation, to_8bit

Box = tuple[float, float, float, float]


def _shown(img: Image.Image) -> tuple[int, int, int]:
    """(EXIF orientation, displayed width, displayed height) of an opened image, from its header."""
    orientation = exif_orientation(img)
    return (orientation, *displayed_size(img.size, orientation))


def stored_box(box: tuple[int, int, int, int], orientation: int, size: tuple[int, int]
               ) -> tuple[int, int, int, int]:
    """The box of the stored pixels (an image of stored `size`) that `TRANSPOSES[orientation]` turns into
    `box` of the displayed image; `box` itself for orientation 1. Exact for whole-pixel boxes, so cropping
    this box and transposing the crop gives the pixels of displaying first and cropping `box` after."""
    if orientation not in TRANSPOSES:
        return box
    width, height = size
    x0, y0, x1, y1 = box
    # the stored point (u, v) shown at displayed (x, y), for each orientation (inverse of the transpose)
    corners = [{2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y), 5: (y, x),
                6: (y, height - x), 7: (width - y, height - x), 8: (width - y, x)}[orientation]
               for x, y in ((x0, y0), (x1, y1))]
    (u0, v0), (u1, v1) = corners
    return min(u0, u1), min(v0, v1), max(u0, u1), max(v0, v1)


def _draft_for(img: Image.Image, box: Box, size: int, orientation: int = 1) -> Box:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the crop still covers `size` pixels; rescale box
    (drawn on the displayed image of `orientation`)."""
    if img.format != "JPEG":
        return box
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    factor = min(crop_w, crop_h) / size
    if factor < 2:
        return box
    full_w, full_h = img.size
    img.draft("RGB", (math.ceil(full_w / factor), math.ceil(full_h / factor)))
    shown_w, shown_h = displayed_size((full_w, full_h), orientation)
    now_w, now_h = displayed_size(img.size, orientation)
    sx, sy = now_w / shown_w, now_h / shown_h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _upright(img: Image.Image, box: tuple[int, int, int, int], orientation: int) -> Image.Image:
    """The whole-pixel `box` of the displayed image, in RGB or L: only those stored pixels are decoded
    (from a draft, only those of the reduced decode), converted and transposed."""
    region = img.crop(stored_box(box, orientation, img.size))  # decodes the image; copies only the crop
    if region.mode not in ("RGB", "L"):
        # palette / alpha / CMYK / 16-bit: after the crop, so only the pixels kept are converted;
        # 16-bit / float grey rescaled, not clipped at 255
        region = to_8bit(region).convert("RGB")
    return region.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else region


def _resize_box(img: Image.Image, size: int, box: Box, orientation: int = 1) -> Image.Image:
    box = _draft_for(img, box, size, orientation)
    if orientation in TRANSPOSES or img.mode not in ("RGB", "L"):
        # palette / alpha / CMYK: resampling needs a plain colour mode; an EXIF orientation: the crop is
        # turned upright. Crop first (cheap in any mode) so both touch only the pixels the crop keeps
        width, height = displayed_size(img.size, orientation)
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        x1, y1 = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
        img = _upright(img, (x0, y0, x1, y1), orientation)
        box = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return out if out.mode == "RGB" else out.convert("RGB")


def _resize_box_array(img: Image.Image, size: int, box: Box, orientation: int = 1) -> np.ndarray:
    """uint8 [size, size, 3] of `box` of `img` as displayed (`orientation`): draft decode, whole-pixel crop,
    torch bicubic resize."""
    box = _draft_for(img, box, size, orientation)
    width, height = displayed_size(img.size, orientation)
    x0 = min(max(int(round(box[0])), 0), width - 1)
    y0 = min(max(int(round(box[1])), 0), height - 1)
    x1 = min(max(int(round(box[2])), x0 + 1), width)
    y1 = min(max(int(round(box[3])), y0 + 1), height)
    region = _upright(img, (x0, y0, x1, y1), orientation)
    if region.mode != "RGB":
        region = region.convert("RGB")  # L
    arr = np.asarray(region)
    if arr.shape[0] == arr.shape[1] == size:
        return arr
    with warnings.catch_warnings():  # np.asarray(PIL image) is read-only; torch only reads it here
        warnings.simplefilter("ignore", UserWarning)
        chw = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last memory: the fast kernel
    out = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _rrc_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator | None
) -> tuple[int, int, int, int]:
    if rng is None:
        raise TypeError("random_resized_crop needs an explicit numpy Generator `rng` (reproducible crops)")
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
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


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
    reproducible from its key. The crop is of the image as displayed (EXIF orientation applied).
    """
    orientation, width, height = _shown(img)
    return _resize_box(img, size, _rrc_box(width, height, scale, ratio, rng), orientation)


def random_resized_crop_array(
    img: Image.Image,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """`random_resized_crop` (same box for the same `rng`) as uint8 [size, size, 3], the fast way."""
    orientation, width, height = _shown(img)
    return _resize_box_array(img, size, _rrc_box(width, height, scale, ratio, rng), orientation)


def _center_box(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Evaluation view: shorter side resized to `size`, then the centred size x size square.

    Done as one resize of the centred square box, which is the same geometry without an intermediate.
    The image is taken as displayed (EXIF orientation applied).
    """
    orientation, width, height = _shown(img)
    return _resize_box(img, size, _center_box(width, height), orientation)


def center_crop_resize_array(img: Image.Image, size: int) -> np.ndarray:
    """`center_crop_resize` as uint8 [size, size, 3], the fast way."""
    orientation, width, height = _shown(img)
    return _resize_box_array(img, size, _center_box(width, height), orientation)


def to_normalized_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> float32 [3, H, W], scaled to [0, 1] then normalised per channel."""
    arr = np.asarray(to_8bit(img).convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    mean_a = np.asarray(mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    arr = (arr - mean_a) * inv_std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """RGB image -> uint8 [H, W, 3]; normalisation is left to `normalize_batch` (one pass per batch)."""
    return np.asarray(to_8bit(img).convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


def normalize_batch(
    images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [B, 3, H, W], scaled to [0, 1] and normalised per channel.

    One transposing copy into a preallocated tensor and two in-place ops for the whole batch, instead of
    four array passes per sample; same values as `to_normalized_array`.
    """
    stacked = torch.from_numpy(np.stack(images))
    b, h, w, c = stacked.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32)
    out.copy_(stacked.permute(0, 3, 1, 2))
    mean_t = torch.tensor([m * 255.0 for m in mean], dtype=torch.float32).view(1, c, 1, 1)
    scale_t = torch.tensor([1.0 / (s * 255.0) for s in std], dtype=torch.float32).view(1, c, 1, 1)
    return out.sub_(mean_t).mul_(scale_t)
