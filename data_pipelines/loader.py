"""Training and evaluation data streams: sharded, shuffled, augmented, tokenized and resumable.

Layout of the training stream, per rank and per DataLoader worker (a *stream*):

    epoch e:  shards (shuffled by (seed, e))  ->  [rank::world]  ->  [worker::workers]
              -> webdataset tar expansion (bad shards counted, not raised)
              -> shuffle buffer seeded by (seed, e, rank, worker), drained at the end of the epoch
              -> decode + crop + normalise  (per-sample RNG from (seed, e, hash(key)))
              -> batches of train.micro_batch, tokenized and masked inside the worker

Each stream is a pure function of the seed and the shard list, so its position is (epoch, raw samples taken
from the shuffle buffer). Batches carry that position; `PositionTracker` turns the consumed ones into a
checkpointable dict, and `make_train_loader(..., position=...)` restarts every stream there, skipping the
consumed raw samples without decoding them. PyTorch's DataLoader always serves worker 0 first, so after k
consumed batches actual worker a plays stream (a + k) % workers to keep the round-robin order unchanged.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import Config

from .collate import EvalExample, TrainExample, collate_eval, collate_train
from .decode import decode_image, label_of, split_sample
from .position import PositionTracker, parse_position, streams_for
from .seeding import derive_seed, sample_rngs
from .sharding import check_enough_shards, epoch_shards
from .shardstream import shard_samples
from .stats import SkipCounter
from .tokenizer import TextTokenizer
from .transforms import center_crop_resize, random_resized_crop, to_normalized_array
from .urls import expand_urls

__all__ = ["PositionTracker", "make_eval_loader", "make_train_loader"]

logger = logging.getLogger("data_pipelines")

_MAX_EMPTY_EPOCHS = 3
_PREFETCH = 4


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TrainStream(IterableDataset):
    """The infinite per-worker training stream described in the module docstring."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, shards: list[str], rank: int, world: int,
                 starts: dict[int, tuple[int, int]], batches_done: int) -> None:
        super().__init__()
        d, m = cfg.data, cfg.model
        self.tokenizer = tokenizer
        self.shards = shards
        self.rank, self.world = rank, world
        self.num_streams = streams_for(d.workers)
        self.starts = starts
        self.batches_done = batches_done
        self.seed = cfg.train.seed
        self.shard_shuffle = d.shard_shuffle
        self.shuffle_buffer = d.shuffle_buffer
        self.batch_size = cfg.train.micro_batch
        self.image_size = m.image_size
        self.crop_scale = tuple(d.crop_scale)
        self.mean, self.std = tuple(d.mean), tuple(d.std)
        self.context_length = m.text.context_length
        self.mask_prob = cfg.objectives.mlm.mask_prob
        self.num_patches = (m.image_size // m.vision.patch_size) ** 2

    def __iter__(self) -> Iterator[dict[str, Any]]:
        actual, count = _worker()
        if count != self.num_streams:
            raise RuntimeError(f"training stream was built for {self.num_streams} DataLoader worker(s) but "
                               f"runs in {count}; use the loader make_train_loader returns")
        return self._stream((actual + self.batches_done) % self.num_streams)

    def _epoch_samples(self, stream: int, epoch: int, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        shards = epoch_shards(self.shards, epoch, self.seed, self.shard_shuffle, self.rank, self.world,
                              stream, self.num_streams)
        raw = shard_samples(shards, skips)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, stream))
            raw = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        return raw

    def _example(self, sample: dict[str, Any], epoch: int, skips: SkipCounter) -> TrainExample | None:
        parts = split_sample(sample, skips)
        if parts is None:
            return None
        data, caption = parts
        key = sample["__key__"]
        crop_rng, mlm_rng, noise_rng = sample_rngs(self.seed, epoch, key)
        img = decode_image(data, key, skips,
                           lambda im: random_resized_crop(im, self.image_size, self.crop_scale, rng=crop_rng))
        if img is None:
            return None
        return TrainExample(key, to_normalized_array(img, self.mean, self.std), caption, label_of(sample),
                            mlm_rng, noise_rng)

    def _stream(self, stream: int) -> Iterator[dict[str, Any]]:
        epoch, drop = self.starts.get(stream, (0, 0))
        skips = SkipCounter(where=f"rank {self.rank} worker {stream}")
        pending: list[TrainExample] = []
        empty_epochs = 0
        while True:
            offset = delivered = 0
            for sample in self._epoch_samples(stream, epoch, skips):
                offset += 1
                if offset <= drop:
                    continue  # consumed before the checkpoint: skip without decoding
                example = self._example(sample, epoch, skips)
                if example is None:
                    continue
                delivered += 1
                pending.append(example)
                if len(pending) == self.batch_size:
                    batch = collate_train(pending, self.tokenizer, self.context_length, self.mask_prob,
                                          self.num_patches)
                    batch["_position"] = {"worker": stream, "epoch": epoch, "offset": offset}
                    batch["_skips"] = skips.as_dict()
                    pending = []
                    yield batch
            if delivered == 0 and drop == 0:
                empty_epochs += 1
                shards = epoch_shards(self.shards, epoch, self.seed, self.shard_shuffle, self.rank,
                                      self.world, stream, self.num_streams)
                msg = (f"rank {self.rank} worker {stream}: no usable samples in epoch {epoch} from "
                       f"{len(shards)} shard(s) {shards[:4]}{'...' if len(shards) > 4 else ''}; "
                       f"skips so far: {skips.as_dict()}")
                if empty_epochs >= _MAX_EMPTY_EPOCHS:
                    raise RuntimeError(f"{msg} ({empty_epochs} epochs in a row, giving up)")
                logger.warning(msg)
            else:
                empty_epochs = 0
            drop = 0
            epoch += 1


class _EvalStream(IterableDataset):
    """Every sample of the eval shards once, in shard order (per worker), centre-cropped, no randomness."""

    def __init__(self, shards: list[str], tokenizer: TextTokenizer, image_size: int, batch_size: int,
                 context_length: int, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        self.shards = shards
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.context_length = context_length
        self.mean, self.std = tuple(mean), tuple(std)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, count = _worker()
        skips = SkipCounter(where=f"eval worker {worker}")
        pending: list[EvalExample] = []
        for sample in shard_samples(self.shards[worker::count], skips):
            parts = split_sample(sample, skips)
            if parts is None:
                continue
            data, caption = parts
            img = decode_image(data, sample["__key__"], skips,
                               lambda im: center_crop_resize(im, self.image_size))
            if img is None:
                continue
            pending.append(EvalExample(sample["__key__"], to_normalized_array(img, self.mean, self.std),
                                       caption, label_of(sample)))
            if len(pending) == self.batch_size:
                yield self._batch(pending, skips)
                pending = []
        if pending:
            yield self._batch(pending, skips)

    def _batch(self, examples: list[EvalExample], skips: SkipCounter) -> dict[str, Any]:
        batch = collate_eval(examples, self.tokenizer, self.context_length)
        batch["_skips"] = skips.as_dict()
        return batch


def _data_loader(dataset: IterableDataset, workers: int, persistent: bool) -> DataLoader:
    if workers > 0:
        # workers tokenise one batch at a time; Rust thread pools in forked workers only add contention
        # (and the tokenizers library warns about fork-after-parallelism without this)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=_PREFETCH if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


def make_train_loader(
    cfg: Config,
    tokenizer: TextTokenizer,
    rank: int,
    world: int,
    position: dict[str, Any] | None = None,
) -> Iterable[dict[str, Any]]:
    """Infinite iterable of training batches for `rank` of `world` (see the module docstring).

    Batch keys: image f32 [B,3,S,S], text / mlm_input / mlm_labels i64 [B,L], patch_noise f32 [B,P],
    cls i64 [B], _keys, _position {worker, epoch, offset}, _skips {reason: count}. `position` is a
    `PositionTracker.state()` saved with the same world size and data.workers.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    m = cfg.model
    if m.image_size % m.vision.patch_size:
        raise ValueError(f"model.image_size ({m.image_size}) is not a multiple of model.vision.patch_size "
                         f"({m.vision.patch_size})")
    if cfg.train.micro_batch < 1:
        raise ValueError(f"train.micro_batch must be >= 1, got {cfg.train.micro_batch}")
    if cfg.data.workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {cfg.data.workers}")
    shards = expand_urls(cfg.data.train)
    check_enough_shards(len(shards), world, cfg.data.workers)
    starts: dict[int, tuple[int, int]] = {}
    batches_done = 0
    if position is not None:
        starts, batches_done = parse_position(position, world, streams_for(cfg.data.workers))
    dataset = _TrainStream(cfg, tokenizer, shards, rank, world, starts, batches_done)
    return _data_loader(dataset, cfg.data.workers, persistent=True)


def make_eval_loader(
    urls: str,
    tokenizer: TextTokenizer,
    image_size: int,
    batch_size: int,
    context_length: int,
    mean: Iterable[float],
    std: Iterable[float],
    workers: int = 0,
) -> Iterable[dict[str, Any]]:
    """Finite iterable over every sample of `urls` once, without augmentation; re-iterable.

    Batches hold image, text, cls, _keys and _skips; the last batch may be smaller. With workers > 0 each
    worker reads every workers-th shard, so the order is shard order within each worker.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = expand_urls(urls)
    workers = min(max(int(workers), 0), len(shards))
    dataset = _EvalStream(shards, tokenizer, image_size, batch_size, context_length, mean, std)
    return _data_loader(dataset, workers, persistent=False)
