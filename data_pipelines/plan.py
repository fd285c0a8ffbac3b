"""Which samples each stream reads in each epoch: work items, fresh epoch plans and the elastic re-deal.

This module is the layout-independent core of exact epoch coverage and exact (elastic) resume.

Vocabulary
----------
* **stream**: one DataLoader worker of one data-parallel rank; stream `g = rank + world * worker` of
  `n = world * workers` (with `data.workers=0` the rank itself is its one stream).
* **item**: a slice of one shard, `Item(shard, phase, stride, block, salt, start)`: the shard's samples
  whose index (in tar order) is `phase` modulo `stride`, cut into consecutive blocks of `block` samples,
  each block permuted by a generator seeded from (salt, shard, phase, stride, block number). Everything
  that fixes this order travels inside the item, so an item means the same samples in the same order
  whoever reads it, under any layout or config.
* **progress** of an item is one integer, the number of its samples consumed *in that order*. `start` is the
  progress an item was handed over with (non-zero only after an elastic resume).

Fresh epochs (data.sampling=epoch)
----------------------------------
Shards are permuted by (seed, epoch). With at least `n` shards every shard is one item and stream `g` gets
items `g, g+n, ...` of the permuted list, i.e. `shards[rank::world][worker::workers]`. With fewer shards
than streams, each shard is split into `m = ceil(n / shards)` strided items (every m-th sample) so every
stream still gets work -- nothing hangs, nothing is dropped, nothing read twice. Every sample of the epoch
lies in exactly one item and every item is dealt to exactly one stream: exact coverage, no communication.

Resampled epochs (data.sampling=resampled) draw `ceil(shards / n)` whole shards per stream with
replacement (weighted by source), seeded by (seed, epoch, stream, n); "epoch" is then a virtual epoch.

Elastic resume
--------------
A stream's saved state (see `StreamState`) names its current epoch, its items there (explicitly, or "the
fresh plan of (epoch, g, n)"), how many it opened, the progress of each open one, and explicit item lists
for later epochs if it is itself still working off an earlier re-deal. From all saved streams the
remaining work of every epoch that any stream is still inside is recovered as items with their `start`
progress; epochs after that are untouched and start fresh under the new layout. The remaining items of
each such epoch are put back in their global order (see `remaining_work`) and dealt round-robin to the
new streams. Because an item's order does not depend on who reads it, "skip the first `start` samples"
is exactly "skip what was seen".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .seeding import derive_seed

SAMPLING_MODES = ("epoch", "resampled")
_SALT_MASK = (1 << 62) - 1
_RESAMPLE_TAG = 0x5E5A


class Item(NamedTuple):
    """A slice of one shard with a reader-independent sample order; see the module docstring."""

    shard: int
    phase: int
    stride: int
    block: int
    salt: int
    start: int = 0

    def with_start(self, start: int) -> Item:
        return self._replace(start=int(start))

    @classmethod
    def parse(cls, raw: Any) -> Item:
        values = [int(v) for v in raw]
        if len(values) != 6:
            raise ValueError(f"data position: an item needs 6 integers, got {raw!r}")
        item = cls(*values)
        if item.shard < 0 or item.stride < 1 or not 0 <= item.phase < item.stride or item.block < 1 \
                or item.start < 0:
            raise ValueError(f"data position: invalid item {raw!r}")
        return item


@dataclass(frozen=True)
class PlanParams:
    """Everything a fresh epoch plan depends on besides (epoch, stream, streams)."""

    num_shards: int
    seed: int
    shard_shuffle: bool
    block: int
    sampling: str = "epoch"
    source_sizes: tuple[int, ...] = ()
    """Shards per `::`-separated source, in order (resampled weighting)."""
    weights: tuple[float, ...] = ()
    """Relative weight of each source (resampled only); empty: every shard equally likely."""

    def as_dict(self) -> dict[str, Any]:
        return {"num_shards": self.num_shards, "seed": self.seed, "shard_shuffle": self.shard_shuffle,
                "block": self.block, "sampling": self.sampling, "source_sizes": list(self.source_sizes),
                "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlanParams:
        try:
            return cls(num_shards=int(raw["num_shards"]), seed=int(raw["seed"]),
                       shard_shuffle=bool(raw["shard_shuffle"]), block=int(raw["block"]),
                       sampling=str(raw.get("sampling", "epoch")),
                       source_sizes=tuple(int(v) for v in raw.get("source_sizes", ())),
                       weights=tuple(float(v) for v in raw.get("weights", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"data position: invalid plan parameters {raw!r}: {exc}") from None

    def shard_probabilities(self) -> np.ndarray:
        """Per-shard draw probability in resampled mode: source weight spread evenly over its shards."""
        if not self.weights:
            return np.full(self.num_shards, 1.0 / self.num_shards)
        probs = np.concatenate([np.full(size, w / size) for size, w in zip(self.source_sizes, self.weights)])
        return probs / probs.sum()


def epoch_salt(seed: int, epoch: int) -> int:
    """The within-shard permutation salt of a fresh epoch (so each epoch reads shards in a new order)."""
    return derive_seed(seed, epoch) & _SALT_MASK


def shard_order(params: PlanParams, epoch: int) -> list[int]:
    """Shard indices in the order of `epoch`: a (seed, epoch) permutation, or as listed."""
    if not params.shard_shuffle:
        return list(range(params.num_shards))
    perm = np.random.default_rng([params.seed & ((1 << 64) - 1), epoch]).permutation(params.num_shards)
    return [int(i) for i in perm]


def fresh_items(params: PlanParams, epoch: int, stream: int, streams: int) -> list[Item]:
    """Items of `stream` (of `streams`) in a fresh `epoch`; see the module docstring."""
    if not 0 <= stream < streams:
        raise ValueError(f"stream {stream} is not in [0, {streams})")
    if params.sampling == "resampled":
        rng = np.random.default_rng(derive_seed(params.seed, epoch, stream, streams, _RESAMPLE_TAG))
        count = max(1, math.ceil(params.num_shards / streams))
        shards = rng.choice(params.num_shards, size=count, replace=True, p=params.shard_probabilities())
        salt = derive_seed(params.seed, epoch, stream, streams) & _SALT_MASK
        return [Item(int(s), 0, 1, params.block, salt) for s in shards]
    return list(_epoch_items(params, epoch, streams)[stream::streams])


@functools.lru_cache(maxsize=8)
def _epoch_items(params: PlanParams, epoch: int, streams: int) -> tuple[Item, ...]:
    """All items of a fresh epoch in dealing order (cached: every stream of a layout slices the same)."""
    order = shard_order(params, epoch)
    salt = epoch_salt(params.seed, epoch)
    stride = max(1, math.ceil(streams / params.num_shards))
    return tuple(Item(s, phase, stride, params.block, salt) for phase in range(stride) for s in order)


def split_counts(sizes: list[int | None], params: PlanParams, streams: int) -> list[int | None]:
    """Samples each stream gets in fresh epoch 0 when shard sizes are known (None where unknown)."""
    counts: list[int | None] = []
    for g in range(streams):
        total: int | None = 0
        for item in fresh_items(params, 0, g, streams):
            size = sizes[item.shard]
            if size is None or total is None:
                total = None
                continue
            total += max(0, math.ceil((size - item.phase) / item.stride))
        counts.append(total)
    return counts


@dataclass
class StreamState:
    """Where one stream is; the `_position` every batch carries and the unit a checkpoint stores.

    `items` None means "the fresh plan of (epoch, stream, streams)" (kept implicit so positions stay
    small); `open` holds [index into the items, progress] of the items being interleaved.
    """

    epoch: int = 0
    items: list[Item] | None = None
    opened: int = 0
    open: list[list[int]] = field(default_factory=list)
    draws: int = 0
    later: dict[int, list[Item]] = field(default_factory=dict)
    offset: int = 0
    """Raw samples taken in this epoch (informational)."""
    delivered: int = 0
    """Good samples this stream delivered, all epochs (for the bad-sample fraction)."""
    shards: int = 0
    """Items opened, all epochs (for the bad-shard fraction)."""
    skips: dict[str, int] = field(default_factory=dict)

    def as_dict(self, worker: int) -> dict[str, Any]:
        return {
            "worker": worker, "epoch": self.epoch, "offset": self.offset,
            "items": None if self.items is None else [list(i) for i in self.items],
            "opened": self.opened, "open": [list(o) for o in self.open], "draws": self.draws,
            "later": {str(e): [list(i) for i in items] for e, items in sorted(self.later.items())},
            "delivered": self.delivered, "shards": self.shards, "skips": dict(sorted(self.skips.items())),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StreamState:
        try:
            items = raw.get("items")
            state = cls(
                epoch=int(raw["epoch"]),
                items=None if items is None else [Item.parse(i) for i in items],
                opened=int(raw["opened"]),
                open=[[int(a), int(b)] for a, b in raw.get("open", [])],
                draws=int(raw.get("draws", 0)),
                later={int(e): [Item.parse(i) for i in lst] for e, lst in dict(raw.get("later", {})).items()},
                offset=int(raw.get("offset", 0)),
                delivered=int(raw.get("delivered", 0)),
                shards=int(raw.get("shards", 0)),
                skips={str(k): int(v) for k, v in dict(raw.get("skips", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"data position: invalid stream state {raw!r}: {exc}") from None
        if state.epoch < 0 or state.opened < 0 or state.draws < 0 or any(p < 0 for _, p in state.open):
            raise ValueError(f"data position: negative counter in stream state {raw!r}")
        return state

    def items_of(self, params: PlanParams, stream: int, streams: int) -> list[Item]:
        return fresh_items(params, self.epoch, stream, streams) if self.items is None else self.items


def remaining_work(states: dict[int, StreamState], params: PlanParams, streams: int) -> dict[int, list[Item]]:
    """Epoch -> items not yet (fully) consumed, from every stream `g -> state` of a saved layout.

    Covers every epoch from the earliest any stream is in to the last one any stream has explicit items
    or progress for; later epochs are untouched by all streams and need no entry.

    Order (what the re-deal hands out round-robin): first the open items of every stream, then the
    streams' unopened items in the order they were dealt (item i of stream g sat at place i*n + g).
    A fresh epoch dealt items round-robin from one list, so this restores that list's order: the global
    sequence of items continues as it was, and when every stream stopped at an item boundary a new layout
    whose batches cover whole items reads the same global batches the old layout would have read.
    """
    if not states:
        return {}
    last = max(max([s.epoch, *s.later]) for s in states.values())
    first = min(s.epoch for s in states.values())
    opened: dict[int, list[Item]] = {e: [] for e in range(first, last + 1)}
    pending: dict[int, list[tuple[int, int, Item]]] = {e: [] for e in range(first, last + 1)}
    for g in sorted(states):
        state = states[g]
        items = state.items_of(params, g, streams)
        for index, progress in state.open:
            if not 0 <= index < len(items):
                raise ValueError(f"data position: stream {g} has an open item {index} of {len(items)}")
            opened[state.epoch].append(items[index].with_start(progress))
        # (index in the stream's list, stream): item i of stream g was dealt at global place i*n + g
        pending[state.epoch].extend((i, g, it) for i, it in enumerate(items) if i >= state.opened)
        for epoch in range(state.epoch + 1, last + 1):
            later = state.later[epoch] if epoch in state.later else fresh_items(params, epoch, g, streams)
            pending[epoch].extend((i, g, it) for i, it in enumerate(later))
    return {e: opened[e] + [it for _, _, it in sorted(pending[e], key=lambda p: p[:2])] for e in opened}


def redeal(work: dict[int, list[Item]], streams: int) -> dict[int, StreamState]:
    """Start states of `streams` new streams that share `work` (epoch -> items) round-robin."""
    epochs = sorted(work)
    ordered = {e: list(work[e]) for e in epochs}
    states: dict[int, StreamState] = {}
    for g in range(streams):
        lists = {e: ordered[e][g::streams] for e in epochs}
        if epochs:
            first = epochs[0]
            states[g] = StreamState(epoch=first, items=lists[first],
                                    later={e: lists[e] for e in epochs[1:]})
        else:
            states[g] = StreamState()
    return states
