"""`pretrain embed`: image and text embeddings of a checkpoint, saved as one .npz.

    pretrain embed --checkpoint RUN_DIR --data 'val/shard-{000000..000001}.tar' --out emb.npz
    pretrain embed --checkpoint RUN_DIR --images photos/ --texts captions.txt --out emb.npz
    pretrain embed --checkpoint RUN_DIR --data URLS --backend onnx --dtype int8 --workers 2 --out emb.npz
    pretrain embed --checkpoint RUN_DIR --data URLS --sharded --out emb/     # resumable, one file per shard

The arrays are the model's own `encode_image` / `encode_text` (fp32, L2-normalised) on exactly the eval
inputs: shards go through the eval loader, image files through the same decode + centre-crop + normalise
path, texts through the run's tokenizer. The .npz holds `image` [N, E], `text` [N or M, E], `keys` (sample
keys for --data, in the same order as both arrays, which are pairs; image file names for --images) and, for
--texts, `texts` (the lines). It is written to a temporary name and renamed, so a crash never leaves a
truncated file under the final name.

`--backend onnx [--dtype fp32|fp16|int8]` exports the checkpoint's encoders to ONNX first (a temporary
folder, `pretrain.evaluation.encoders`) and encodes with onnxruntime; `--backend torch` (default) is the
eager fp32 model. Images are decoded in `--workers` DataLoader worker processes while the main process
encodes, as in training; rows stay in input order whatever the worker count. `--sharded` writes one
`.npy` pair + `.parquet` of metadata per input shard and resumes (`pretrain.evaluation.embed_store`);
a resume into a folder made by another checkpoint, backend, dtype or shard list is refused.
Undecodable images are skipped and counted (`skipped` in the printed summary), never fatal.
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
from data_pipelines.urls import expand_sources

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


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _add(total: dict[str, int], skips: dict[str, int]) -> None:
    for k, v in skips.items():
        total[k] = total.get(k, 0) + int(v)


def eval_workers(urls: str, workers: int, max_samples: int) -> int:
    """Workers for the eval loader such that each reads whole shards (at most one per shard), so the skip
    counts each worker carries can be attributed and summed; a --max-samples run (a small one) uses one
    stream, where the eval loader would otherwise split positions across workers."""
    if max_samples or workers <= 0:
        return 0
    return min(workers, sum(len(s) for s in expand_sources(urls)))


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


class _FileChunks(torch.utils.data.Dataset):
    """Chunk k of the files, decoded, cropped and normalised (in a DataLoader worker when there are any)."""

    def __init__(self, files: list[Path], batch_size: int, image_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], max_pixels: int) -> None:
        self.chunks = list(_chunks(files, batch_size))
        self.image_size, self.mean, self.std, self.max_pixels = image_size, mean, std, max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, list[str], dict[str, int]]:
        skips = SkipCounter(where="embed")
        arrays, names = _load_images(self.chunks[k], self.image_size, self.max_pixels, skips)
        return (normalize_batch(arrays, self.mean, self.std) if arrays else None), names, skips.as_dict()


@torch.no_grad()
def embed_image_files(model: Any, files: list[Path], image_size: int, mean: Iterable[float],
                      std: Iterable[float], batch_size: int, max_pixels: int = 0, workers: int = 0,
                      skipped: dict[str, int] | None = None) -> tuple[np.ndarray, list[str]]:
    """[N, E] normalised embeddings of the readable `files` and their names, in the given order (chunks
    decoded by `workers` processes; a map-style DataLoader returns them in order). Unreadable files are
    skipped and counted into `skipped`."""
    device = _device(model)
    data = _FileChunks(files, batch_size, image_size, tuple(mean), tuple(std), max_pixels)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=min(workers, len(data)))
    rows, names, skips = [], [], {}
    for images, chunk_names, chunk_skips in loader:
        _add(skips, chunk_skips)
        if images is not None:
            rows.append(model.encode_image(images.to(device)).cpu())
            names.extend(chunk_names)
    if skipped is not None:
        _add(skipped, skips)
    if not rows:
        raise ValueError(f"no readable image among {len(files)} files (skips: {skips})")
    return torch.cat(rows).numpy(), names


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: list[str], context_length: int, batch_size: int
                ) -> np.ndarray:
    """[M, E] normalised embeddings of `texts`, tokenized as in training."""
    device = _device(model)
    rows = [model.encode_text(tokenizer.encode_batch(chunk, context_length).to(device)).cpu()
            for chunk in _chunks(texts, batch_size)]
    return torch.cat(rows).numpy()


@torch.no_grad()
def embed_shards(model: Any, tokenizer: Any, cfg: Any, urls: str, batch_size: int, max_samples: int = 0,
                 workers: int = 0, skipped: dict[str, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paired image and text embeddings of every readable sample of `urls` (eval loader, shard order
    whatever the number of decode `workers`); skip counts by reason are added to `skipped`."""
    device = _device(model)
    workers = eval_workers(urls, workers, max_samples)
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size,
                              cfg.model.text.context_length, cfg.data.mean, cfg.data.std, workers=workers,
                              max_sample_bytes=cfg.data.max_sample_bytes, empty_batches=True)
    imgs, txts, keys, order = [], [], [], []
    last: dict[int, dict[str, int]] = {}
    unread: dict[str, int] = {}  # skips of workers without a usable sample
    for batch in loader:
        if not batch["_keys"]:  # such a worker's one batch: no rows, its whole (cumulative) skip count
            _add(unread, batch["_skips"])
            continue
        imgs.append(model.encode_image(batch["image"].to(device)).cpu())
        txts.append(model.encode_text(batch["text"].to(device)).cpu())
        keys.extend(batch["_keys"])
        order.append(batch["_order"])
        last[int(batch["_order"][0, 0]) % max(workers, 1)] = batch["_skips"]  # cumulative per worker
        if max_samples and len(keys) >= max_samples:
            break
    if skipped is not None:
        for s in [*last.values(), unread]:
            _add(skipped, s)
    if not keys:
        raise ValueError(f"--data: no readable samples in {urls}")
    pos = torch.cat(order)
    perm = np.lexsort((pos[:, 1].numpy(), pos[:, 0].numpy()))  # workers interleave batches: shard order
    n = min(len(keys), max_samples) if max_samples else len(keys)
    perm = perm[:n]
    return torch.cat(imgs)[perm].numpy(), torch.cat(txts)[perm].numpy(), [keys[i] for i in perm]


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


def _check_fast(data: str | None, out: str | Path, backend: str, dtype: str, workers: int, sharded: bool,
                max_samples: int) -> None:
    from pretrain.evaluation.encoders import check_backend

    check_backend(backend, dtype)
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if sharded and not data:
        raise ValueError("--sharded writes one output shard per input shard: it needs --data URLS")
    if sharded and max_samples:
        raise ValueError("--sharded encodes whole shards; --max-samples applies to .npz output")
    if sharded and Path(out).is_file():
        raise FileExistsError(f"--out {out} is a file; --sharded writes a folder")


def embed(checkpoint: str | Path, out: str | Path, data: str | None = None, images: str | Path | None = None,
          texts: str | Path | None = None, batch_size: int = 64, max_samples: int = 0,
          device: str | None = None, overwrite: bool = True, backend: str = "torch", dtype: str = "fp32",
          workers: int = 0, sharded: bool = False, info: dict[str, Any] | None = None
          ) -> dict[str, np.ndarray]:
    """Embed `--data` shards (paired) or `--images` files and/or `--texts` lines with the checkpoint's
    model and write them to `out` (.npz); returns the arrays written (keys in the module docstring).

    `max_samples` (0: all) caps samples, image files and text lines alike. `backend`/`dtype` choose the
    encoder (`pretrain.evaluation.encoders`), `workers` the decode processes. With `sharded` (needs
    `data`) `out` is a resumable folder (`pretrain.evaluation.embed_store`) and the returned dict is empty.
    `info`, when given, receives `skipped` ({reason: count}) and, with `sharded`, the index. Argument
    errors raise ValueError / FileNotFoundError before the checkpoint is read.
    """
    _check_fast(data, out, backend, dtype, workers, sharded, max_samples)
    _check_inputs(checkpoint, data, images, texts, batch_size, max_samples, None if sharded else out,
                  overwrite or sharded)
    files = image_files(images, max_samples) if images is not None else []
    lines = text_lines(texts, max_samples) if texts is not None else []
    from pretrain.evaluation.encoders import open_encoder

    info = {} if info is None else info
    skipped: dict[str, int] = info.setdefault("skipped", {})
    if sharded:  # before the (slow) load: a folder of another run is refused at once
        from pretrain.evaluation.embed_store import claim, embed_sharded, fingerprint

        fp = fingerprint(checkpoint, backend, dtype, data)
        claim(Path(out), fp)
    with open_encoder(checkpoint, backend, dtype, device=device) as (model, tokenizer, cfg):
        if sharded:
            index = embed_sharded(model, tokenizer, cfg, data, Path(out), batch_size, workers,
                                  {"checkpoint": fp["checkpoint"], "backend": backend, "dtype": dtype})
            info["index"] = index
            _add(skipped, index["skips"])
            return {}
        dim = cfg.model.embed_dim
        empty = np.zeros((0, dim), dtype=np.float32)
        result: dict[str, np.ndarray] = {"image": empty, "text": empty, "keys": np.array([], dtype=str)}
        if data:
            img, txt, keys = embed_shards(model, tokenizer, cfg, data, batch_size, max_samples, workers,
                                          skipped)
            result.update(image=img, text=txt, keys=np.array(keys, dtype=str))
        if files:
            img, names = embed_image_files(model, files, cfg.model.image_size, cfg.data.mean, cfg.data.std,
                                           batch_size, cfg.data.max_image_pixels, workers, skipped)
            result.update(image=img, keys=np.array(names, dtype=str))
        if lines:
            result.update(text=embed_texts(model, tokenizer, lines, cfg.model.text.context_length,
                                           batch_size), texts=np.array(lines, dtype=str))
    write_npz(out, result)
    return result


# ------------------------------------------------------------------------------------------ CLI
def cmd_embed(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {}
    result = embed(args.checkpoint, args.out, data=args.data, images=args.images, texts=args.texts,
                   batch_size=args.batch_size, max_samples=args.max_samples, overwrite=args.overwrite,
                   backend=args.backend, dtype=args.dtype, workers=args.workers, sharded=args.sharded,
                   info=info)
    summary = {"out": str(args.out), **{k: list(v.shape) for k, v in result.items()}}
    if args.sharded:
        index = info["index"]
        summary.update(rows=index["rows"], shards=len(index["shards"]),
                       encoded_this_run=index["encoded_this_run"])
    summary["skipped"] = sum(info["skipped"].values())
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
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="eager PyTorch, or onnxruntime on the checkpoint exported on the fly")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="encoder precision (fp16/int8: --backend onnx; int8 = dynamic quantisation)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader processes decoding images while the main process encodes (0: none)")
    p.add_argument("--sharded", action="store_true",
                   help="--out is a folder: one .npy pair + .parquet per input shard, resumable")
    p.set_defaults(func=cmd_embed)
