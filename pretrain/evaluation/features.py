"""Image and text features of held-out shards from a model, on every data-parallel rank at once.

Used by `pretrain eval` (a loaded checkpoint, replicated on each rank) and by validation during training
(the live model: ZeRO-3 partitioned, tensor-parallel). The split, the gather and the exact metrics are in
`pretrain.evaluation.distributed`; this module holds what depends on the model: the forwards, the dummy
batch of a rank whose share has run out, and the zero-shot classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from data_pipelines.loader import make_eval_loader
from data_pipelines.urls import expand_sources
from parallel import groups
from pretrain.evaluation.distributed import StreamSkips, encode_share, gather_features, sum_skips, warn_skips

TEMPLATES = (
    "a photo of a {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a {} in the image.",
)
"""Prompt templates of the zero-shot classifier when a dataset brings none."""


def model_device(model: Any) -> torch.device:
    """Where the model's parameters live; the CPU for a model without any (e.g. a wrapper around another
    library's CLIP that only offers encode_image / encode_text)."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def classifier_weights(model: Any, tokenizer: Any, classnames: list[str], context_length: int,
                       templates: tuple[str, ...] | list[str] = TEMPLATES) -> torch.Tensor:
    """[C, E] class embeddings: each class's prompt embeddings averaged, then re-normalised. Every rank
    runs the same text forwards (ZeRO-3 needs that)."""
    device = model_device(model)
    rows = []
    for name in classnames:
        ids = tokenizer.encode_batch([t.format(name) for t in templates], context_length).to(device)
        emb = model.encode_text(ids).mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def _dp() -> tuple[int, int, Any]:
    if groups.is_distributed() and groups.world_size() > 1:
        return groups.dp_rank(), groups.dp_world_size(), groups.get_data_parallel_group()
    return 0, 1, None


def stream_workers(urls: str, workers: int, max_samples: int, dp_world: int) -> int:
    """Decode workers per rank such that every stream (rank x worker) reads whole shards, so the skip counts
    each one carries can be attributed and summed (`StreamSkips`): at most shards // ranks; none with a
    `max_samples` cap, where the eval loader would deal positions over the workers."""
    if max_samples or workers <= 0:
        return 0
    return min(workers, sum(len(s) for s in expand_sources(urls)) // max(dp_world, 1))


def eval_share(urls: str, tokenizer: Any, cfg: Any, batch_size: int, max_samples: int, workers: int,
               masking: tuple[int, float, int] | None = None, captions: bool = True,
               labels: bool = False) -> tuple[Any, StreamSkips]:
    """This data-parallel rank's eval batches of `urls` (zero-row batches of skip-only streams included,
    which `encode_share` reads past) and the `StreamSkips` counting them as they are read. `captions` /
    `labels`: what a sample must hold (`make_eval_loader`; a classifier's: `captions=False, labels=True`)."""
    dp_rank, dp_world, _ = _dp()
    workers = stream_workers(urls, workers, max_samples, dp_world)
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size,
                              cfg.model.text.context_length, cfg.data.mean, cfg.data.std, workers=workers,
                              max_sample_bytes=cfg.data.max_sample_bytes, rank=dp_rank, world=dp_world,
                              max_samples=max_samples, masking=masking, empty_batches=True,
                              captions=captions, labels=labels)
    skips = StreamSkips(workers)
    return skips.watch(loader), skips


@torch.no_grad()
def shard_features(model: Any, tokenizer: Any, cfg: Any, urls: str, batch_size: int, max_samples: int = 0,
                   *, texts: bool = True, dtype: torch.dtype | None = None, workers: int = 0,
                   masking: tuple[int, float, int] | None = None,
                   on_batch: Callable[[dict[str, Any], bool], None] | None = None,
                   pairs: bool = False, skipped: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Gathered features of `urls` (first `max_samples` positions; 0: all), identical on every rank and in
    single-process order: `image` [N, E], `text` [N, E] (with `texts`), `cls` [N], `_order` [N, 2].

    This rank encodes only its data-parallel share. `dtype` is the model's input dtype (bf16 under
    DeepSpeed bf16). `on_batch(batch, uniform)` runs before the encoders on each real batch (validation
    losses; `uniform`: every rank holds a batch of this size). ValueError (on every rank) when no rank read
    a usable sample. `pairs` also gathers each sample's caption ids `ids` [N, L] and fp32 `pixels`
    [N, 3, S, S], what ITM re-ranking feeds the fusion encoder (`pretrain.evaluation.rerank`).

    Samples the loader skipped, summed over the ranks, are added to `skipped` ({reason: count}; the same on
    every rank) and logged as a warning naming `urls`. `workers` is capped so that each stream reads
    whole shards (`stream_workers`)."""
    device = model_device(model)
    _, _, dp_group = _dp()
    L, S = cfg.model.text.context_length, cfg.model.image_size
    loader, skips = eval_share(urls, tokenizer, cfg, batch_size, max_samples, workers, masking)
    in_dtype = dtype or torch.float32

    def encode(batch: dict[str, Any] | None, uniform: bool) -> dict[str, torch.Tensor]:
        if batch is None:  # this rank's share is done: the same forwards on one blank sample
            images = torch.zeros(1, 3, S, S, dtype=in_dtype, device=device)
            ids = torch.zeros(1, L, dtype=torch.long, device=device)
            order = torch.zeros(1, 2, dtype=torch.long, device=device)
            cls = torch.full((1,), -1, dtype=torch.long, device=device)
        else:
            if on_batch is not None:
                on_batch(batch, uniform)
            images = batch["image"].to(device=device, dtype=in_dtype)
            ids, order = batch["text"].to(device), batch["_order"].to(device)
            cls = batch["cls"].to(device)
        out = {"image": model.encode_image(images), "cls": cls, "_order": order}
        if texts:
            out["text"] = model.encode_text(ids)
        if pairs:
            out["ids"], out["pixels"] = ids, images.float()
        return out

    local = encode_share(loader, encode, device)
    n = torch.tensor([len(local.get("_order", ()))], dtype=torch.int64, device=device)
    if groups.is_distributed() and groups.world_size() > 1:
        torch.distributed.all_reduce(n)
    lost = sum_skips(skips.total(), dp_group)
    if skipped is not None:
        for k, v in lost.items():
            skipped[k] = skipped.get(k, 0) + v
    if not int(n[0]):
        raise ValueError(f"{urls}: no readable samples to evaluate" + (f" (skipped: {lost})" if lost else ""))
    feats = gather_features(local, dp_group)
    warn_skips(urls, lost, len(feats["_order"]))
    return feats
