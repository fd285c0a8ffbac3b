"""Training and evaluation data streams: sharded, shuffled, augmented, tokenized and resumable.

Layout of the training stream, per rank and per DataLoader worker (a *stream*, see `plan`):

    epoch e:  work items (whole shards, or strided slices of shards when shards < streams)
              -> dealt to stream g = rank + world * worker (`plan.fresh_items`, or a re-deal on resume)
              -> `interleave` items open at once, next sample from a seeded random one (`cursor`)
              -> inside each item: blocks of `shuffle_buffer / interleave` samples, each block permuted
              -> decode + checks + crop (per-sample RNG from (seed, e, key)), skips counted by reason
              -> batches of train.micro_batch, tokenized, masked and normalised inside the worker

Every sample of an epoch lies in exactly one item and every item goes to exactly one stream, so an epoch
is covered exactly once across ranks x workers. A stream's whole state is a few integers per open item
(`plan.StreamState`); each batch carries it as `_position`, `PositionTracker` keeps the consumed ones, and
`make_train_loader(..., position=...)` restarts every stream there: from its own state when the layout is
unchanged (identical batches), or from a re-deal of the unconsumed items when ranks/workers changed
(exactly the unseen samples). The stream is infinite: epoch e+1 follows epoch e in each stream, so ranks
never run dry at different times.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import EvalExample, TrainExample, collate_empty, collate_eval, collate_train
from .cursor import StreamCursor
from .decode import decode_image, negative_caption_of, negative_captions_of, sample_parts
from .empty_epochs import EmptyEpochs
from .plan import PlanParams, StreamState, split_counts
from .position import PositionTracker, shards_fingerprint, start_states, stream_index, streams_for
from .seeding import sample_rngs
from .settings import DEFAULT_MAX_SAMPLE_BYTES, DataConfig, StreamSpec
from .shardstream import shard_samples
from .stats import SkipCounter, SkipGate
from .tokenizer import TextTokenizer
from .transforms import center_crop_resize_array, random_resized_crop_array
from .urls import expand_sources, known_sizes

__all__ = ["PositionTracker", "TrainLoader", "make_eval_loader", "make_train_loader", "plan_params"]

_PREFETCH = 4


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def plan_params(d: DataConfig, seed: int, sources: list[list[str]]) -> PlanParams:
    """The plan parameters of `data.*` and `train.seed` over the expanded `::` sources of data.train."""
    return PlanParams(
        num_shards=sum(len(s) for s in sources), seed=seed, shard_shuffle=d.shard_shuffle,
        block=max(1, d.shuffle_buffer // max(d.interleave, 1)), sampling=d.sampling,
        source_sizes=tuple(len(s) for s in sources), weights=tuple(d.train_weights))


class _TrainStream(IterableDataset):
    """The infinite per-worker training stream described in the module docstring."""

    def __init__(self, d: DataConfig, spec: StreamSpec, tokenizer: TextTokenizer, urls: list[str],
                 params: PlanParams, rank: int, world: int, starts: dict[int, StreamState],
                 batches_done: int, needs: tuple[bool, bool] = (True, False)) -> None:
        super().__init__()
        self.needs = needs  # (captions, labels) a sample must have: `decode.sample_parts`
        self.tokenizer = tokenizer
        self.urls = urls
        self.params = params
        self.rank, self.world = rank, world
        self.num_streams = streams_for(d.workers)
        self.starts = starts
        self.batches_done = batches_done
        self.seed = spec.seed
        self.interleave = d.interleave
        self.batch_size = spec.micro_batch
        self.image_size = spec.image_size
        self.crop_scale = tuple(d.crop_scale)
        self.max_pixels = d.max_image_pixels
        self.max_bytes = d.max_sample_bytes
        self.max_bad_fraction = d.max_bad_fraction
        self.mean, self.std = tuple(d.mean), tuple(d.std)
        self.context_length = spec.context_length
        self.mask_prob = spec.mlm_prob
        self.num_patches = spec.num_patches
        self.caption_negatives = spec.caption_negatives
        self.negatives_per_step = spec.negatives_per_step
        self.skew_phrase = spec.skew_phrase

    def __iter__(self) -> Iterator[dict[str, Any]]:
        actual, count = _worker()
        if count != self.num_streams:
            raise RuntimeError(f"training stream was built for {self.num_streams} DataLoader worker(s) but "
                               f"runs in {count}; use the loader make_train_loader returns")
        return self._stream((actual + self.batches_done) % self.num_streams)

    def _example(self, sample: dict[str, Any], epoch: int, skips: SkipCounter) -> TrainExample | None:
        parts = sample_parts(sample, skips, *self.needs)
        if parts is None:
            return None
        data, caption, label = parts
        key = sample["__key__"]
        crop_rng, mlm_rng, noise_rng = sample_rngs(self.seed, epoch, key)
        view = lambda im: random_resized_crop_array(im, self.image_size, self.crop_scale, rng=crop_rng)
        img = decode_image(data, key, skips, view, max_pixels=self.max_pixels)
        if img is None:
            return None
        negatives = negative_captions_of(sample, epoch, skips, self.caption_negatives,
                                         self.negatives_per_step)
        return TrainExample(key, img, caption, label, mlm_rng, noise_rng, epoch,
                            negatives[0] if negatives else "", tuple(negatives[1:]))

    def _stream(self, worker: int) -> Iterator[dict[str, Any]]:
        state = copy.deepcopy(self.starts[worker])
        stream = stream_index(self.rank, self.world, worker)
        skips = SkipCounter(where=f"rank {self.rank} worker {worker}")
        skips.restore(state.skips)
        cursor = StreamCursor(self.urls, self.params, state, stream, self.world * self.num_streams,
                              self.interleave, skips, self.max_bytes)
        empty = EmptyEpochs(skips.where, self.urls, self.params, self.world * self.num_streams,
                            self.max_bad_fraction)
        pending: list[TrainExample] = []
        while True:
            empty.begin(cursor, state, skips)
            while (sample := cursor.next_in_epoch()) is not None:
                example = self._example(sample, state.epoch, skips)
                if example is None:
                    continue
                state.delivered += 1
                pending.append(example)
                if len(pending) == self.batch_size:
                    batch = collate_train(pending, self.tokenizer, self.context_length, self.mask_prob,
                                          self.num_patches, self.mean, self.std, self.skew_phrase)
                    state.skips = skips.as_dict()
                    batch["_position"] = state.as_dict(worker)
                    batch["_skips"] = dict(state.skips)
                    pending = []
                    yield batch
            empty.end(cursor, state, skips)  # an epoch without a sample: go on, or give up (empty_epochs)
            cursor.next_epoch()


class _EvalStream(IterableDataset):
    """The eval shards' samples once each, centre-cropped, no augmentation; this stream's share only.

    Stream g of G (G = world x workers, g = rank x workers + worker) takes
      - whole shards s with s % G == g when there are at least G shards and no cap, or
      - the samples at global positions p (in shard order) with p % G == g, over the first `max_samples`
        positions (every stream reads those tar bytes, decodes only its own; stream 0 alone counts a bad
      shard), otherwise;
    so the union over streams is exactly the single-process set. Each batch carries `_order` [B, 2]
    (shard index, position in shard): sorting gathered rows by it gives the single-process order.
    With `masking` = (seed, mlm_prob, num_patches) batches also hold `mlm_input`, `mlm_labels` and
    `patch_noise` drawn from (seed, epoch 0, key): the same masks on every call and in every layout.
    """

    def __init__(self, shards: list[str], tokenizer: TextTokenizer, image_size: int, batch_size: int,
                 context_length: int, mean: Iterable[float], std: Iterable[float], max_bytes: int,
                 rank: int = 0, world: int = 1, max_samples: int = 0,
                 masking: tuple[int, float, int] | None = None, empty_batches: bool = False,
                 needs: tuple[bool, bool] = (True, False)) -> None:
        super().__init__()
        self.empty_batches, self.needs = empty_batches, needs
        self.shards = shards
        self.max_bytes = max_bytes
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.context_length = context_length
        self.mean, self.std = tuple(mean), tuple(std)
        self.rank, self.world, self.max_samples, self.masking = rank, world, max_samples, masking

    def _positions(self, stream: int, streams: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        skips = self._skips
        if len(self.shards) >= streams and not self.max_samples:
            for s in range(stream, len(self.shards), streams):
                for j, sample in enumerate(shard_samples([self.shards[s]], skips, max_bytes=self.max_bytes)):
                    yield s, j, sample
            return
        p = 0
        shared = SkipGate(skips, counting=stream == 0)  # every stream reads these shards: count them once
        for s, url in enumerate(self.shards):
            for j, sample in enumerate(shard_samples([url], shared, max_bytes=self.max_bytes)):
                if self.max_samples and p >= self.max_samples:
                    return
                if p % streams == stream:
                    yield s, j, sample
                p += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, count = _worker()
        self._stream = stream = self.rank * count + worker
        self._skips = skips = SkipCounter(where=f"eval worker {worker}")
        pending: list[tuple[Any, tuple[int, int]]] = []
        # a full batch is held until the next usable sample (or the end) is read: consumers take the skip
        # counts from a stream's last batch (`_skips` is cumulative), so it must count the bad samples after
        # its own last one
        full: list[tuple[Any, tuple[int, int]]] = []
        usable = False
        for s, j, sample in self._positions(stream, self.world * count):
            parts = sample_parts(sample, skips, *self.needs)
            if parts is None:
                continue
            data, caption, label = parts
            key = sample["__key__"]
            img = decode_image(data, key, skips, lambda im: center_crop_resize_array(im, self.image_size))
            if img is None:
                continue
            if self.masking is None:
                example: Any = EvalExample(key, img, caption, label)
            else:
                _, mlm_rng, noise_rng = sample_rngs(self.masking[0], 0, key)
                example = TrainExample(key, img, caption, label, mlm_rng, noise_rng,
                                       negative=negative_caption_of(sample, 0, skips))
            if full:
                yield self._batch(full, skips)
                full = []
            usable = True  # a batch will carry this stream's counts
            pending.append((example, (s, j)))
            if len(pending) == self.batch_size:
                full, pending = pending, []
        for rest in (full, pending):  # at most one of them holds samples
            if rest:
                yield self._batch(rest, skips)
        if self.empty_batches and not usable and skips.as_dict():
            # no usable sample, so no batch would carry these counts to the consumer: a zero-row one does
            # (with `_stream`, which tells whose they are: it has no `_order` to tell its shard by)
            patches = None if self.masking is None else self.masking[2]
            yield {**collate_empty(self.context_length, self.image_size, patches), "_skips": skips.as_dict(),
                   "_stream": self._stream}

    def _batch(self, pending: list[tuple[Any, tuple[int, int]]], skips: SkipCounter) -> dict[str, Any]:
        examples = [e for e, _ in pending]
        if self.masking is None:
            batch = collate_eval(examples, self.tokenizer, self.context_length, self.mean, self.std)
        else:
            _, mlm_prob, num_patches = self.masking
            batch = collate_train(examples, self.tokenizer, self.context_length, mlm_prob, num_patches,
                                  self.mean, self.std)
        batch["_order"] = torch.tensor([o for _, o in pending], dtype=torch.long).reshape(-1, 2)
        batch["_skips"] = skips.as_dict()
        batch["_stream"] = self._stream  # rank x workers + worker: the stream whose counts `_skips` are
        return batch


WORKER_SIGTERM_GRACE_S = 300
"""How long a DataLoader worker keeps serving batches after a SIGTERM from outside its rank."""


def _watch_sigterm(parent: int) -> None:
    """The worker's SIGTERM, taken synchronously (with its sender) on a thread of its own."""
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 5.0)
        if os.getppid() != parent or (info is not None and info.si_pid == parent):
            os._exit(0)  # its rank is gone, or is shutting it down (what torch's own handler does)
        if info is not None:
            signal.alarm(WORKER_SIGTERM_GRACE_S)  # SIGALRM's default action ends it then


def _worker_init(_: int) -> None:
    """A worker outlives a SIGTERM sent to every process (Slurm's scancel or preemption, `kill -- -PGID`).

    torch's workers end on SIGTERM from anyone but their parent, and the rank then raises "DataLoader worker
    killed" instead of finishing its step and saving the checkpoint its own SIGTERM handler asked for. Here
    SIGTERM is blocked in the worker and taken by a thread that sees who sent it: from the rank (its
    shutdown of the worker), or once the rank is gone, the worker exits at once as before; from anyone else
    it goes on serving until the ranks have agreed to stop, and ends at the latest WORKER_SIGTERM_GRACE_S
    later, so it cannot outlive its job for long."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_watch_sigterm, args=(os.getppid(),), name="mmpt-worker-sigterm",
                     daemon=True).start()


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
        worker_init_fn=_worker_init if workers > 0 else None,
    )


class TrainLoader:
    """Iterable of training batches, plus `tracker`: a `PositionTracker` primed with every worker's start
    state (so a checkpoint written before a worker delivers anything still records its place)."""

    def __init__(self, loader: DataLoader, tracker: PositionTracker) -> None:
        self.loader = loader
        self.tracker = tracker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def _check_streams_have_samples(urls: list[str], params: PlanParams, world: int, streams: int) -> None:
    """With shard sizes known (sizes.json), fail before training if some stream would get no sample."""
    if params.sampling != "epoch":
        return
    counts = split_counts(known_sizes(urls), params, world * streams)
    empty = [g for g, c in enumerate(counts) if c == 0]
    if empty:
        total = sum(c for c in counts if c)
        g = empty[0]
        raise ValueError(
            f"{len(urls)} shard(s) with {total} samples cannot feed {world} ranks x {streams} workers: "
            f"{len(empty)} stream(s) (first: rank {g % world} worker {g // world}) would get no sample per "
            f"epoch; lower data.workers or the number of ranks, or write more samples")


def make_train_loader(
    data: DataConfig,
    spec: StreamSpec,
    tokenizer: TextTokenizer,
    rank: int,
    world: int,
    position: dict[str, Any] | list[dict[str, Any]] | None = None,
    captions: bool = True,
    labels: bool = False,
) -> TrainLoader:
    """Infinite iterable of training batches for data-parallel `rank` of `world` (see the module docstring).

    Batch keys: image f32 [B,3,S,S], text / mlm_input / mlm_labels i64 [B,L], patch_noise f32 [B,P],
    cls i64 [B], _keys, _epochs (epoch of each sample), _position (the stream's `StreamState`, with worker,
    epoch and offset), _skips {reason: count}. `position` is the checkpoint's list of every rank's
    `PositionTracker.state()` (any earlier layout), or this rank's entry under an unchanged layout.
    Ranges and divisibility of `data` and `spec` are checked once, by `pretrain.config.validate`.
    A classifier (`train.task=classify`) passes `captions=False, labels=True`: image + `.cls`, no caption
    needed (`decode.sample_parts`); CLIP pretraining (the default) needs captions.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    sources = expand_sources(data.train)
    if data.train_weights and len(data.train_weights) != len(sources):  # needs the expanded sources
        raise ValueError(f"data.train_weights has {len(data.train_weights)} entries for {len(sources)} "
                         f"'::'-separated sources of data.train")
    urls = [u for source in sources for u in source]
    params = plan_params(data, spec.seed, sources)
    streams = streams_for(data.workers)
    _check_streams_have_samples(urls, params, world, streams)
    fingerprint = shards_fingerprint(urls)
    starts, batches_done = start_states(params, fingerprint, rank, world, data.workers, position)
    tracker = PositionTracker(params, fingerprint, rank, world, data.workers, starts, batches_done)
    dataset = _TrainStream(data, spec, tokenizer, urls, params, rank, world, starts, batches_done,
                           (captions, labels))
    return TrainLoader(_data_loader(dataset, data.workers, persistent=True), tracker)


def make_eval_loader(
    urls: str,
    tokenizer: TextTokenizer,
    image_size: int,
    batch_size: int,
    context_length: int,
    mean: Iterable[float],
    std: Iterable[float],
    workers: int = 0,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    rank: int = 0,
    world: int = 1,
    max_samples: int = 0,
    masking: tuple[int, float, int] | None = None,
    empty_batches: bool = False,
    captions: bool = True,
    labels: bool = False,
) -> Iterable[dict[str, Any]]:
    """Finite iterable over every sample of `urls` once (this rank's share of `world`), without
    augmentation; re-iterable.

    Batches hold image, text, cls, _keys, _order (shard index, position in shard), _skips (counts by
    reason, cumulative per stream: a stream's last batch counts every sample it skipped) and _stream (that
    stream's number: rank x workers + worker); the last batch may
    be smaller. `max_samples` > 0 keeps the first that many positions in shard order (unreadable
    samples among them are skipped and counted). The split between ranks and workers is in `_EvalStream`;
    the union over all ranks is the same set in every layout. `masking` = (seed, mlm_prob, num_patches)
    adds fixed-seed MLM inputs/labels and MAE patch noise (validation losses). Samples over
    `max_sample_bytes` (`data.max_sample_bytes`) are skipped as `too_large`. With `empty_batches`, a
    stream that skipped samples but read no usable one (e.g. a worker whose shard is all corrupt) yields
    one zero-row batch (`_keys` empty) carrying its `_skips`, which would otherwise reach no consumer;
    callers that sum skips pass it and must accept zero-row batches (off by default for those that don't).
    `captions` / `labels`: what a sample must hold, as for `make_train_loader` (both False: images alone).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    shards = [u for source in expand_sources(urls) for u in source]
    workers = min(max(int(workers), 0), len(shards))
    dataset = _EvalStream(shards, tokenizer, image_size, batch_size, context_length, mean, std,
                          max_sample_bytes, rank=rank, world=world, max_samples=max_samples, masking=masking,
                          empty_batches=empty_batches, needs=(captions, labels))
    return _data_loader(dataset, workers, persistent=False)
