"""`pretrain bench data`: samples/s of our training stream vs. a plain reference pipeline, same shards.

Both pipelines deliver decoded, augmented (random-resized crop to `image_size`, bicubic), normalised,
tokenized and batched samples through a DataLoader with the same worker count:

* **ours**: `make_train_loader` exactly as training runs it (JPEG draft decode when the crop allows,
  crop+resize in one call, batch normalisation and batch tokenization in the worker) -- and it also
  computes the MLM masks and MAE patch noise training needs, which the reference does not;
* **reference**: what open_clip-style training does with plain webdataset: `tarfile_to_samples`,
  shuffle buffer, `decode("pilrgb")` (full decode of every member), torchvision's RandomResizedCrop
  re-implemented with PIL exactly as torchvision does it for PIL images (`get_params`, then `crop`, then
  `resize`; torchvision itself is not installed here), ToTensor + Normalize per sample, one tokenizer call
  per caption, `batched` collation.

The first `warmup` batches (worker start-up, first shard opens) are not timed. `ratio` compares samples
per CPU-second (main process + DataLoader workers, from /proc), i.e. per core, which stays meaningful when
other jobs share the machine; `ratio_wall` compares wall-clock samples/s.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from .loader import make_train_loader
from .settings import DataConfig, StreamSpec
from .shardstream import shard_samples
from .stats import SkipCounter
from .tokenizer import TextTokenizer, load_tokenizer, train_tokenizer_from_shards
from .urls import expand_sources, expand_urls

REFERENCE = ("webdataset tarfile_to_samples + shuffle(500) + decode('pilrgb') (full PIL decode) + "
             "torchvision-style RandomResizedCrop done with PIL as torchvision does (get_params, crop, "
             "resize; bicubic) + ToTensor/Normalize per sample + one tokenizer call per caption + batched")


class TorchvisionStyleRRC:
    """torchvision.transforms.RandomResizedCrop on PIL images, re-implemented line by line with PIL."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 interpolation: int = Image.Resampling.BICUBIC) -> None:
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def get_params(self, img: Image.Image) -> tuple[int, int, int, int]:
        width, height = img.size
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img)
        return img.crop((j, i, j + w, i + h)).resize((self.size, self.size), self.interpolation)


def _to_tensor_normalized(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor + Normalize for a PIL RGB image."""
    t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    t = t.permute(2, 0, 1).contiguous().float().div(255)
    return (t - mean[:, None, None]) / std[:, None, None]


def reference_loader(urls: list[str], tok: TextTokenizer, batch_size: int, workers: int, image_size: int,
                     crop_scale: tuple[float, float], context_length: int, mean: Iterable[float],
                     std: Iterable[float]) -> DataLoader:
    """The plain webdataset pipeline described in the module docstring (repeats forever)."""
    rrc = TorchvisionStyleRRC(image_size, crop_scale)
    mean_t, std_t = torch.tensor(list(mean)), torch.tensor(list(std))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(500),
        wds.decode("pilrgb"),
        wds.to_tuple("jpg;png;jpeg;webp", "txt"),
        wds.map_tuple(lambda im: _to_tensor_normalized(rrc(im), mean_t, std_t),
                      lambda text: tok.encode_batch([text], context_length)[0]),
        wds.batched(batch_size, partial=False),
    ).repeat()
    return DataLoader(pipeline, batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None, persistent_workers=workers > 0)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (Linux /proc; 0 where unreadable)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _measure(loader: Iterable[Any], batches: int, warmup: int, batch_size: int) -> dict[str, float]:
    """Wall-clock samples/s, and samples per CPU-second of the main process plus its DataLoader workers
    (per core: robust when other jobs share the machine)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    t0, main0, workers0 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - main0 + _cpu_seconds(pids) - workers0
    samples = batches * batch_size
    return {"samples_per_s": round(samples / elapsed, 2),
            "samples_per_cpu_s": round(samples / max(cpu, 1e-9), 2), "seconds": round(elapsed, 3),
            "cpu_seconds": round(cpu, 3), "samples": samples}


def _combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """Totals over alternating repeats (no best-of picking): samples / wall seconds, samples / CPU seconds."""
    seconds = sum(r["seconds"] for r in runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    samples = sum(r["samples"] for r in runs)
    return {"samples_per_s": round(samples / seconds, 2),
            "samples_per_cpu_s": round(samples / max(cpu, 1e-9), 2), "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3), "samples": samples}


def run_bench(shards: str, batch_size: int = 64, workers: int = 1, image_size: int = 224, batches: int = 30,
              warmup: int = 3, tokenizer: str = "", crop_scale: tuple[float, float] = (0.6, 1.0),
              repeats: int = 1) -> dict[str, Any]:
    """Throughput of both pipelines on `shards` (`repeats` alternating runs each, totals reported)."""
    if batch_size < 1 or batches < 1 or warmup < 0 or workers < 0 or repeats < 1:
        raise ValueError("batch-size, batches and repeats must be >= 1, warmup and workers >= 0")
    urls = [u for source in expand_sources(shards) for u in source]
    if workers > len(urls):
        raise ValueError(f"{len(urls)} shards for {workers} workers: the reference pipeline splits by "
                         f"whole shards, so give at least as many shards as workers")
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer_from_shards(shards, 512, 2000)
    data = DataConfig(train=shards, workers=workers, crop_scale=list(crop_scale))
    spec = StreamSpec(micro_batch=batch_size, image_size=image_size,
                      patch_size=math.gcd(image_size, 16) if image_size % 16 else 16)
    ours_runs, ref_runs = [], []
    for _ in range(repeats):
        loader = make_train_loader(data, spec, tok, rank=0, world=1)
        ours_runs.append(_measure(loader, batches, warmup, batch_size))
        ref = reference_loader(urls, tok, batch_size, workers, image_size, crop_scale, spec.context_length,
                               data.mean, data.std)
        ref_runs.append(_measure(ref, batches, warmup, batch_size))
    ours, reference = _combine(ours_runs), _combine(ref_runs)
    per = max(workers, 1)
    ours["samples_per_s_per_worker"] = round(ours["samples_per_s"] / per, 2)
    reference["samples_per_s_per_worker"] = round(reference["samples_per_s"] / per, 2)
    return {
        "shards": len(urls), "batch_size": batch_size, "workers": workers, "image_size": image_size,
        "crop_scale": list(crop_scale), "timed_batches": batches, "warmup_batches": warmup,
        "repeats": repeats, "ours": ours, "reference": reference,
        "ratio": round(ours["samples_per_cpu_s"] / reference["samples_per_cpu_s"], 3),
        "ratio_wall": round(ours["samples_per_s"] / reference["samples_per_s"], 3),
        "tokenize_captions_per_s": tokenizer_speed(shards, tok, batch_size),
        "reference_pipeline": REFERENCE,
        "note": "ours also computes MLM masks and MAE patch noise; both use bicubic resampling",
    }


def _captions(shards: str, limit: int) -> list[str]:
    """Up to `limit` decodable captions of `shards`, read without the images."""
    out: list[str] = []
    for sample in shard_samples(expand_urls(shards), SkipCounter(where="bench"),
                                select_files=lambda name: name.lower().endswith(".txt")):
        try:
            out.append(sample["txt"].decode("utf-8"))
        except (KeyError, UnicodeDecodeError):
            continue
        if len(out) >= limit:
            break
    return out


def tokenizer_speed(shards: str, tok: Any, batch_size: int, captions: int = 4096) -> dict[str, Any]:
    """Captions/s of batch tokenization (`encode_batch` per `batch_size` captions, one process) for the
    benchmarked tokenizer and for OpenAI CLIP's (`data.tokenizer=clip`), on the same captions of `shards`.

    Each tokenizer encodes the set once untimed first (both keep per-word BPE caches), then once timed."""
    texts = _captions(shards, captions)
    if not texts:
        return {"error": "no captions"}
    while len(texts) < captions:
        texts = texts + texts[:captions - len(texts)]
    out: dict[str, Any] = {"captions": len(texts), "batch_size": batch_size}
    try:
        clip = load_tokenizer("clip")
    except ValueError as exc:  # open_clip_torch not installed
        clip, out["clip_error"] = None, str(exc)
    name = "clip" if tok.pool_type == "argmax" else "bpe"
    for label, t in ((name, tok), ("clip", clip)):
        if t is None or (label == "clip" and "clip" in out):
            continue
        for timed in (False, True):
            start = time.perf_counter()
            for i in range(0, len(texts), batch_size):
                t.encode_batch(texts[i:i + batch_size], 77)
            if timed:
                out[label] = round(len(texts) / (time.perf_counter() - start), 1)
    return out
