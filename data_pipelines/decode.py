"""Turning a raw WebDataset sample (extension -> bytes) into image, caption and label, or a counted skip.

Checks run cheapest first (members present, caption text) so a sample that will be skipped anyway is not
JPEG-decoded. Every failure mode maps to one `SkipCounter` reason.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from .stats import (
    BAD_IMAGE,
    BAD_LABEL,
    BAD_NEGATIVE,
    BAD_TEXT,
    EMPTY_CAPTION,
    IMAGE_TOO_LARGE,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_LABEL,
    MISSING_NEGATIVE,
    TOO_LARGE,
    TOO_LARGE_KEY,
    SkipCounter,
)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
LABEL_KEY = "cls"
NEGATIVE_KEY = "neg.txt"
"""Optional member: captions that do NOT describe the image, one per line (e.g. the true caption with its
attributes swapped, as NegCLIP builds them); `objectives.itm.caption_negatives` trains on them."""


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    """The encoded image of a sample under the first of jpg/jpeg/png/webp present, else None."""
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            return data
    return None


def caption_of(sample: dict[str, Any], skips: SkipCounter) -> str | None:
    """The UTF-8 caption, whitespace-stripped; None (and a counted skip) if missing, undecodable or empty."""
    key = sample.get("__key__", "?")
    raw = sample.get(CAPTION_KEY)
    if raw is None:
        skips.skip(MISSING_CAPTION, key)
        return None
    try:
        text = bytes(raw).decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        skips.skip(BAD_TEXT, f"{key}: {exc}")
        return None
    if not text:
        skips.skip(EMPTY_CAPTION, key)
        return None
    return text


def negative_caption_of(sample: dict[str, Any], epoch: int, skips: SkipCounter | None = None,
                        wanted: bool = False) -> str:
    """The first of `negative_captions_of(..., per_step=1)`: line `epoch` mod n, or ""."""
    lines = negative_captions_of(sample, epoch, skips, wanted)
    return lines[0] if lines else ""


def negative_captions_of(sample: dict[str, Any], epoch: int, skips: SkipCounter | None = None,
                         wanted: bool = False, per_step: int = 1) -> list[str]:
    """The sample's `per_step` negative captions for this epoch (lines (epoch x per_step + j) mod the number n
    of lines of `neg.txt`, j < per_step: every line takes its turn, all of them each step when per_step = n,
    and resume replays the same ones); [] when there is none or it is unreadable.

    The member is optional, so neither case skips the sample, but both are counted in `skips` (the run's
    data report and `skip_<reason>` metrics): `bad_negative` when `neg.txt` is not UTF-8 or holds no caption,
    `missing_negative` when there is none and the run `wanted` one (`objectives.itm.caption_negatives`: the
    model then falls back to a batch negative, which a user who wrote `neg.txt` files would not expect)."""
    key = sample.get("__key__", "?")
    raw = sample.get(NEGATIVE_KEY)
    if raw is None:
        if wanted and skips is not None:
            skips.skip(MISSING_NEGATIVE, f"{key}: no .{NEGATIVE_KEY} member")
        return []
    try:
        lines = [ln.strip() for ln in bytes(raw).decode("utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as exc:
        if skips is not None:
            skips.skip(BAD_NEGATIVE, f"{key}: .{NEGATIVE_KEY}: {exc}")
        return []
    if not lines:
        if skips is not None:
            skips.skip(BAD_NEGATIVE, f"{key}: .{NEGATIVE_KEY} holds no caption")
        return []
    return [lines[(epoch * per_step + j) % len(lines)] for j in range(per_step)]


def label_of(sample: dict[str, Any]) -> int:
    """Integer class from `.cls`, or -1 when absent or not an integer (labels are only used for eval)."""
    raw = sample.get(LABEL_KEY)
    if raw is None:
        return -1
    try:
        return int(bytes(raw).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1


def required_label_of(sample: dict[str, Any], skips: SkipCounter) -> int | None:
    """The `.cls` class index of a classifier's sample; None, counted as `missing_label` (no `.cls`) or
    `bad_label` (not a non-negative integer), when it has none: a classifier cannot use such a sample."""
    key = sample.get("__key__", "?")
    raw = sample.get(LABEL_KEY)
    if raw is None:
        skips.skip(MISSING_LABEL, f"{key}: no .{LABEL_KEY} member")
        return None
    label = label_of(sample)  # the one parser of `.cls`: -1 when it is not an integer
    if label < 0:
        text = bytes(raw).decode("ascii", "replace").strip()
        skips.skip(BAD_LABEL, f"{key}: .{LABEL_KEY} is not a class index: {text[:20]!r}")
        return None
    return label


def honour_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb limit no stricter than ours (`max_pixels`, 0: no limit).

    Pillow refuses images over 2 x `Image.MAX_IMAGE_PIXELS` (178,956,970 by default) and warns over it,
    so `data.max_image_pixels=0` or a value above that would still have skipped large images as
    `image_too_large`. Our limit is checked from the header before any decode, which is the guard; the
    process-wide setting is only ever raised (so threads calling this agree), never lowered.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None:
        return
    if max_pixels <= 0:
        Image.MAX_IMAGE_PIXELS = None
    elif max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""Pillow modes whose `convert("RGB")` clips at 255 (16-bit or 32-bit integer grey, float grey)."""


def to_8bit(img: Image.Image) -> Image.Image:
    """An 8-bit "L" image for a 16/32-bit integer or float grey image; any other image unchanged.

    Pillow's conversion to RGB clips these at 255, so a 16-bit PNG trained as nearly white and a float
    TIFF as black. Integer modes are read as 16-bit data (PNG and TIFF store 16 bits per sample: 0..65535
    -> 0..255, larger values clip), float as the usual 0..1 range (clipped). The scale is fixed, not
    taken from the pixels, so every crop of an image gets the same grey levels.
    """
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    values = np.asarray(img)
    if img.mode == "F":
        scaled = np.nan_to_num(values.astype(np.float32), nan=0.0) * 255.0
    else:
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


ORIENTATION_TAG = 0x0112
"""EXIF `Orientation`: how a viewer turns the stored pixels to display them (phones store the sensor's
landscape pixels and say "rotate 90" here instead of rotating the picture)."""
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""Orientation -> the transpose that displays the stored pixels, as `PIL.ImageOps.exif_transpose` does."""


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, read from what its header holds; 1 when there is
    none or it is not one of 1-8.

    Training, evaluation and the importer all read it (through `transforms` and `displayed_size`) so
    every one of them sees the picture as a viewer shows it, as `ImageOps.exif_transpose` would, without
    decoding the image first: JPEG's APP1 and WebP's EXIF chunk are read by `Image.open`, TIFF's tags on
    request. PNG's `getexif` would decode the whole image to look for an eXIf chunk after the pixel data,
    so for PNG only a chunk (or XMP) before the pixel data counts (where Pillow writes it). A broken EXIF
    block counts as no orientation: the image itself is still usable. A TIFF that Pillow's own reader turns
    upright (recent versions: its size is already the displayed one) has nothing left to apply.
    """
    if img.format == "TIFF" and _pillow_orients_tiff():
        return 1
    try:
        exif = Image.Image.getexif(img) if img.format == "PNG" else img.getexif()
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF (Pillow raises several types): display the pixels as stored
        return 1
    return value if isinstance(value, int) and value in TRANSPOSES else 1


@functools.cache
def _pillow_orients_tiff() -> bool:
    """Whether this Pillow's TIFF reader applies the orientation tag itself (found out once, on a 2x1
    TIFF tagged "rotate 90"), so the tag is not applied twice."""
    buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, "TIFF", tiffinfo={ORIENTATION_TAG: 6})
    with Image.open(buf) as probe:
        return probe.size == (1, 2)


def displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of an image of stored `size` as displayed: swapped for orientations 5-8."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def decode_image(
    data: bytes,
    key: str,
    skips: SkipCounter,
    view: Callable[[Image.Image], Any],
    max_pixels: int = 0,
) -> Any | None:
    """Open the bytes lazily and apply `view` (crop + resize, which forces the decode); None on failure.

    `view` gets the still-undecoded image so it can choose a reduced JPEG decode scale; it returns a
    decoded image or array (the `transforms` views apply the EXIF orientation, `exif_orientation`).
    Images with more
    than `max_pixels` pixels (0: no limit) are refused from the header alone, before any pixel is decoded:
    a few-kB "decompression bomb" would otherwise allocate gigabytes in a DataLoader worker.
    """
    honour_pixel_limit(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels and width * height > max_pixels:
                skips.skip(IMAGE_TOO_LARGE, f"{key}: {width}x{height} > {max_pixels} pixels")
                return None
            out = view(img)
            if isinstance(out, Image.Image):
                out.load()
            return out
    except Image.DecompressionBombError as exc:  # Pillow's own limit: only when set elsewhere, below ours
        skips.skip(IMAGE_TOO_LARGE, f"{key}: {exc}")
        return None
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        skips.skip(BAD_IMAGE, f"{key}: {type(exc).__name__}: {exc}")
        return None


def split_sample(sample: dict[str, Any], skips: SkipCounter) -> tuple[bytes, str] | None:
    """(image bytes, caption) of a sample with both present and a usable caption, else None (counted).

    A sample over data.max_sample_bytes (marked by `shard_samples`) is counted as `too_large`, once.
    """
    parts = sample_parts(sample, skips)
    return None if parts is None else parts[:2]


def sample_parts(sample: dict[str, Any], skips: SkipCounter, captions: bool = True,
                 labels: bool = False) -> tuple[bytes, str, int] | None:
    """(image bytes, caption, label) of a usable sample, else None (counted), checked before any decode.

    What a sample needs depends on its reader, which says so: CLIP readers (`captions`, the default) need
    a usable `.txt` caption, and take the `.cls` label when there is one (-1 otherwise, `label_of`); a
    classifier's (`captions=False, labels=True`) needs the image and a `.cls` class index only: the
    standard labelled image sets (image + `.cls`, as clip_benchmark_export_wds and timm write them) carry
    no caption, so the caption is not read ("") and the skip is a missing or bad label instead
    (`required_label_of`). `captions=False, labels=False` reads images alone (calibration data).
    """
    if TOO_LARGE_KEY in sample:
        skips.skip(TOO_LARGE, f"{sample.get('__key__', '?')}: {sample[TOO_LARGE_KEY]}")
        return None
    data = image_bytes(sample)
    if data is None:
        skips.skip(MISSING_IMAGE, sample.get("__key__", "?"))
        return None
    caption = caption_of(sample, skips) if captions else ""
    if caption is None:
        return None
    label = required_label_of(sample, skips) if labels else label_of(sample)
    if label is None:
        return None
    return data, caption, label
