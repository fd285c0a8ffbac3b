"""Data for `pretrain bench quality`: the synthetic coloured shapes (train + held-out split, both with
classnames.txt) and scikit-learn's real handwritten digits (`load_digits()`: 1,797 8x8 UCI scans, offline)
upscaled into WebDataset shards with `.cls` labels and captions built from the labels."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from data_pipelines.synth import write_synthetic_shards
from data_pipelines.tokenizer import train_tokenizer_from_shards

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


def _write_tar_shards(folder: Path, samples: list[dict[str, Any]], per_shard: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    shards = (len(samples) + per_shard - 1) // per_shard
    for s in range(shards):
        final, tmp = folder / f"shard-{s:06d}.tar", folder / f".shard-{s:06d}.tar.tmp"
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=946684800) as writer:
            for sample in samples[s * per_shard:(s + 1) * per_shard]:
                writer.write(sample)
        os.replace(tmp, final)
    return shards


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
    """`out/train` and `out/val` (every `val_every`-th scan held out), each with classnames.txt."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    samples = [digit_sample(i, digits.data[i], int(digits.target[i]), image_size, rng)
               for i in range(len(digits.target))]
    out = Path(out)
    result: dict[str, Any] = {}
    for split, picked in (("train", [s for i, s in enumerate(samples) if i % val_every]),
                          ("val", samples[::val_every])):
        shards = _write_tar_shards(out / split, picked, per_shard)
        (out / split / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
        result[split], result[f"{split}_samples"] = _urls(out / split, shards), len(picked)
    result["classnames"] = str(out / "val" / "classnames.txt")
    return result


def write_shapes(out: str | Path, image_size: int, train_samples: int, val_samples: int,
                 per_shard: int = 512) -> dict[str, Any]:
    """Synthetic coloured shapes (`pretrain data synth`): train seed 0, held-out split seed 1."""
    out = Path(out)
    tr = write_synthetic_shards(out / "train", train_samples, per_shard, image_size, seed=0)
    va = write_synthetic_shards(out / "val", val_samples, per_shard, image_size, seed=1)
    return {"train": tr["urls"], "train_samples": train_samples, "val": va["urls"],
            "val_samples": val_samples, "classnames": va["classnames"]}


def prepare_dataset(name: str, out: str | Path, image_size: int, vocab_size: int,
                    shapes_train: int = 4096, shapes_val: int = 1024) -> dict[str, Any]:
    """Write dataset `name` ("shapes" or "digits") under `out/name` plus one tokenizer.json trained on its
    train captions, shared by every recipe (and by open_clip_train) so all runs read the same tokens."""
    folder = Path(out) / name
    if name == "shapes":
        info = write_shapes(folder, image_size, shapes_train, shapes_val)
    elif name == "digits":
        info = write_digits(folder, image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}: choose shapes or digits")
    tok = train_tokenizer_from_shards(info["train"], vocab_size, 5000)
    info["tokenizer"] = str(folder / "tokenizer.json")
    tok.save(info["tokenizer"])
    return {"name": name, **info}
