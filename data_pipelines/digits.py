"""Real images that ship inside a Python package: scikit-learn's handwritten digits (1,797 8x8 UCI scans,
offline) as WebDataset shards with captions built from the labels, `.cls` and classnames.txt, for
benchmarks and tests that need data not drawn by our own generator (`pretrain bench quality`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .clip_benchmark import write_templates
from .shardwriter import ShardWriter

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {} written by hand",
    "a scanned handwritten digit {}",
    "a white {} on a black background",
)
"""Captions: one template per sample (seeded), filled with the class name."""


def _urls(folder: Path, shards: int) -> str:
    return f"{folder}/shard-{{000000..{shards - 1:06d}}}.tar" if shards > 1 else f"{folder}/shard-000000.tar"


def digit_sample(index: int, pixels: np.ndarray, label: int, image_size: int, rng: np.random.Generator
                 ) -> dict[str, Any]:
    """One digit: the 8x8 scan (0-16) scaled to 0-255, bicubically upscaled to `image_size`, as RGB JPEG."""
    grey = Image.fromarray((pixels.reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    img = grey.resize((image_size, image_size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    caption = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))].format(DIGIT_NAMES[label])
    return {"__key__": f"digit{index:05d}", "jpg": buf.getvalue(), "txt": caption.encode(),
            "cls": str(label).encode("ascii")}


def write_digits(out: str | Path, image_size: int, val_every: int = 5, per_shard: int = 200,
                 seed: int = 0) -> dict[str, Any]:
    """`out/train` and `out/val` (every `val_every`-th scan held out), each with classnames.txt and
    zeroshot_classification_templates.txt (CLIP_benchmark's file names)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    samples = [digit_sample(i, digits.data[i], int(digits.target[i]), image_size, rng)
               for i in range(len(digits.target))]
    out = Path(out)
    result: dict[str, Any] = {}
    for split, picked in (("train", [s for i, s in enumerate(samples) if i % val_every]),
                          ("val", samples[::val_every])):
        with ShardWriter(out / split, max_samples=per_shard) as writer:  # atomic shards + sizes.json
            for sample in picked:
                writer.write(sample)
        shards = len(writer.shards)
        (out / split / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
        write_templates(out / split)  # zeroshot_classification_templates.txt: our eval prompts
        result[split], result[f"{split}_samples"] = _urls(out / split, shards), len(picked)
    result["classnames"] = str(out / "val" / "classnames.txt")
    return result
