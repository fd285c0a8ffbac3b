"""Data for `pretrain bench quality`: the synthetic coloured shapes (train + held-out split, both with
classnames.txt) and scikit-learn's real handwritten digits (`load_digits()`: 1,797 8x8 UCI scans, offline)
upscaled into WebDataset shards with `.cls` labels and captions built from the labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipelines.digits import write_digits
from data_pipelines.synth import write_synthetic_shards
from data_pipelines.tokenizer import train_tokenizer_from_shards


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
