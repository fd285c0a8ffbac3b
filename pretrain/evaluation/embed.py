"""`pretrain embed`: image and text embeddings of a checkpoint, saved as one .npz.

    pretrain embed --checkpoint RUN_DIR --data 'val/shard-{000000..000001}.tar' --out emb.npz
    pretrain embed --checkpoint RUN_DIR --images photos/ --texts captions.txt --out emb.npz

The arrays are the model's own `encode_image` / `encode_text` (fp32, L2-normalised) on exactly the eval
inputs: shards go through the eval loader, image files through the same decode + centre-crop + normalise
path, texts through the run's tokenizer. The .npz holds `image` [N, E], `text` [N or M, E], `keys` (sample
keys for --data, in the same order as both arrays, which are pairs; image file names for --images) and, for
--texts, `texts` (the lines). It is written to a temporary name and renamed, so a crash never leaves a
truncated file under the final name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.decode import IMAGE_KEYS, decode_image
from data_pipelines.loader import make_eval_loader
from data_pipelines.stats import BAD_IMAGE, SkipCounter
from data_pipelines.transforms import center_crop_resize_array, normalize_batch

logger = logging.getLogger("mmpt.embed")

IMAGE_SUFFIXES = tuple(f".{k}" for k in IMAGE_KEYS)
"""Image files `--images` picks up (the extensions the shards' decoder accepts)."""


# ------------------------------------------------------------------------------------------ inputs
def _check_inputs(checkpoint: str | Path, data: str | None, images: str | Path | None,
                  texts: str | Path | None, batch_size: int, max_samples: int, out: str | Path | None = None,
                  overwrite: bool = True) -> None:
    """Every argument problem that needs no model, before the (slow) checkpoint load."""
    if out is not None:
        if Path(out).is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; give a .npz file path")
        if Path(out).exists() and not overwrite:
            raise FileExistsError(f"--out {out} exists; choose a new path or pass --overwrite")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if data and (images or texts):
        raise ValueError("give either --data or --images/--texts, not both")
    if not data and not images and not texts:
        raise ValueError("nothing to embed: give --data URLS, or --images DIR and/or --texts FILE")
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"--images: no such folder: {images}")
    if texts is not None and not Path(texts).is_file():
        raise FileNotFoundError(f"--texts: no such file: {texts}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: all), got {max_samples}")


def image_files(folder: str | Path, max_samples: int = 0) -> list[Path]:
    """Image files directly in `folder`, sorted by name (a stable row order); ValueError if none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images: no {'/'.join(IMAGE_KEYS)} files in {folder}")
    return files[:max_samples] if max_samples else files


def text_lines(path: str | Path, max_samples: int = 0) -> list[str]:
    """One text per line (row i of `text` is line i, blank lines included); ValueError for an empty file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"--texts: {path} is empty")
    return lines[:max_samples] if max_samples else lines


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ------------------------------------------------------------------------------------------ encoding
def _load_images(files: list[Path], image_size: int, max_pixels: int, skips: SkipCounter
                 ) -> tuple[list[np.ndarray], list[str]]:
    """Decode + centre crop as the eval stream does; unreadable files are skipped, counted and named."""
    arrays, names = [], []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:  # unreadable file or broken link: skipped and counted like a bad image
            skips.skip(BAD_IMAGE, f"{path.name}: {e}")
            logger.warning("skipping unreadable image %s (%s)", path, e)
            continue
        arr = decode_image(raw, path.name, skips,
                           lambda im: center_crop_resize_array(im, image_size), max_pixels=max_pixels)
        if arr is None:
            logger.warning("skipping unreadable image %s", path)
            continue
        arrays.append(arr)
        names.append(path.name)
    return arrays, names


@torch.no_grad()
def embed_image_files(model: Any, files: list[Path], image_size: int, mean: Iterable[float],
                      std: Iterable[float], batch_size: int, max_pixels: int = 0
                      ) -> tuple[np.ndarray, list[str]]:
    """[N, E] normalised embeddings of the readable `files` and their names, in the given order."""
    mean, std = tuple(mean), tuple(std)
    device = next(model.parameters()).device
    skips = SkipCounter(where="embed")
    rows, names = [], []
    for chunk in _chunks(files, batch_size):
        arrays, chunk_names = _load_images(chunk, image_size, max_pixels, skips)
        if arrays:
            rows.append(model.encode_image(normalize_batch(arrays, mean, std).to(device)).cpu())
            names.extend(chunk_names)
    if not rows:
        raise ValueError(f"no readable image among {len(files)} files (skips: {skips.as_dict()})")
    return torch.cat(rows).numpy(), names


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: list[str], context_length: int, batch_size: int
                ) -> np.ndarray:
    """[M, E] normalised embeddings of `texts`, tokenized as in training."""
    device = next(model.parameters()).device
    rows = [model.encode_text(tokenizer.encode_batch(chunk, context_length).to(device)).cpu()
            for chunk in _chunks(texts, batch_size)]
    return torch.cat(rows).numpy()


@torch.no_grad()
def embed_shards(model: Any, tokenizer: Any, cfg: Any, urls: str, batch_size: int, max_samples: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paired image and text embeddings of every readable sample of `urls` (eval loader, shard order)."""
    device = next(model.parameters()).device
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size,
                              cfg.model.text.context_length, cfg.data.mean, cfg.data.std, workers=0,
                              max_sample_bytes=cfg.data.max_sample_bytes)
    imgs, txts, keys = [], [], []
    for batch in loader:
        imgs.append(model.encode_image(batch["image"].to(device)).cpu())
        txts.append(model.encode_text(batch["text"].to(device)).cpu())
        keys.extend(batch["_keys"])
        if max_samples and len(keys) >= max_samples:
            break
    if not keys:
        raise ValueError(f"--data: no readable samples in {urls}")
    n = min(len(keys), max_samples) if max_samples else len(keys)
    return torch.cat(imgs)[:n].numpy(), torch.cat(txts)[:n].numpy(), keys[:n]


# ------------------------------------------------------------------------------------------ output
def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file in the same folder, then `os.replace`: readers see the old file or
    the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def embed(checkpoint: str | Path, out: str | Path, data: str | None = None, images: str | Path | None = None,
          texts: str | Path | None = None, batch_size: int = 64, max_samples: int = 0,
          device: str | None = None, overwrite: bool = True) -> dict[str, np.ndarray]:
    """Embed `--data` shards (paired) or `--images` files and/or `--texts` lines with the checkpoint's
    model and write them to `out` (.npz); returns the arrays written (keys in the module docstring).

    `max_samples` (0: all) caps samples, image files and text lines alike. Argument errors raise
    ValueError / FileNotFoundError before the checkpoint is read.
    """
    _check_inputs(checkpoint, data, images, texts, batch_size, max_samples, out, overwrite)
    files = image_files(images, max_samples) if images is not None else []
    lines = text_lines(texts, max_samples) if texts is not None else []
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(checkpoint)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dim = cfg.model.embed_dim
    empty = np.zeros((0, dim), dtype=np.float32)
    result: dict[str, np.ndarray] = {"image": empty, "text": empty, "keys": np.array([], dtype=str)}
    if data:
        img, txt, keys = embed_shards(model, tokenizer, cfg, data, batch_size, max_samples)
        result.update(image=img, text=txt, keys=np.array(keys, dtype=str))
    if files:
        img, names = embed_image_files(model, files, cfg.model.image_size, cfg.data.mean, cfg.data.std,
                                       batch_size, cfg.data.max_image_pixels)
        result.update(image=img, keys=np.array(names, dtype=str))
    if lines:
        result.update(text=embed_texts(model, tokenizer, lines, cfg.model.text.context_length, batch_size),
                      texts=np.array(lines, dtype=str))
    write_npz(out, result)
    return result


# ------------------------------------------------------------------------------------------ CLI
def cmd_embed(args: argparse.Namespace) -> int:
    result = embed(args.checkpoint, args.out, data=args.data, images=args.images, texts=args.texts,
                   batch_size=args.batch_size, max_samples=args.max_samples, overwrite=args.overwrite)
    summary = {"out": str(args.out), **{k: list(v.shape) for k, v in result.items()}}
    print(json.dumps(summary), flush=True)
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `pretrain embed` (hooked in through `pretrain.cli.REGISTRARS`)."""
    p = sub.add_parser("embed", help="image/text embeddings of a checkpoint to an .npz",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint folder")
    p.add_argument("--data", help="shard URLs (brace-expandable): paired image and text embeddings")
    p.add_argument("--images", help="folder of jpg/png/webp files, embedded in sorted name order")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True, help=".npz to write (image, text, keys[, texts])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=0,
                   help="at most this many samples / files / lines (0: all)")
    p.set_defaults(func=cmd_embed)
