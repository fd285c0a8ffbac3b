"""One stream's raw samples, epoch after epoch, as a deterministic function of its `StreamState`.

A stream keeps `interleave` items open and takes each next sample from one of them, chosen by a draw from
a counter-indexed generator of (seed, epoch, stream, streams); each item yields its shard slice in the
block-permuted order fixed by the item itself (see `plan`). Restoring a `StreamState` therefore restores
the exact continuation: the same open items at the same progress, the same next draw. Mixing comes from
both levels: `interleave` shards at a time, and a permutation inside each block of `block` samples, which
is what an exact resume can afford (a free-running shuffle buffer would make "which samples were
consumed" depend on buffer contents, not on a few integers).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from .plan import Item, PlanParams, StreamState
from .seeding import derive_seed
from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .shardstream import shard_samples
from .stats import SkipCounter, SkipGate

_DRAW_BLOCK = 1024
_DRAW_TAG = 0xD7A


def item_samples(url: str, item: Item, skips: SkipCounter,
                 max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[dict[str, Any]]:
    """Raw samples of `item` (from `url`) in the item's order, starting after its `start` consumed ones.

    Skipped blocks are read but neither permuted nor yielded; a shard failure ends the item (counted by
    `shard_samples`, as is `max_bytes`, the `data.max_sample_bytes` limit).

    Shard-level problems (`bad_shard`, `duplicate_key`) go into `skips` once per shard per epoch: only
    from phase 0 of a strided shard (every phase reads all of the shard's bytes), and only while reading
    blocks at or past `start` -- the earlier ones were read, and their problems counted, by whoever
    consumed those samples (a block is read whole when its first sample is taken). A `SkipGate` passed as
    `skips` also remembers the problems it met but did not count.
    """
    gate = skips if isinstance(skips, SkipGate) else SkipGate(skips)
    raw = shard_samples([url], gate, max_bytes=max_bytes)
    mine = islice(raw, item.phase, None, item.stride) if item.stride > 1 else raw
    block = max(item.block, 1)
    number = 0
    while True:
        gate.counting = item.phase == 0 and number * block >= item.start
        if block == 1:  # no permutation: the same as below without a generator per sample
            sample = next(mine, None)
            if sample is None:
                return
            if number >= item.start:
                yield sample
            number += 1
            continue
        chunk = list(islice(mine, block))
        if not chunk:
            return
        first = item.start - number * item.block
        if first < len(chunk):
            seed = derive_seed(item.salt, item.shard, item.phase, item.stride, number)
            order = np.random.default_rng(seed).permutation(len(chunk))
            for k in range(max(first, 0), len(chunk)):
                yield chunk[order[k]]
        number += 1


class StreamCursor:
    """Pulls raw samples for one stream; `state` is updated in place and is always resumable."""

    def __init__(self, urls: list[str], params: PlanParams, state: StreamState, stream: int, streams: int,
                 interleave: int, skips: SkipCounter, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> None:
        self.urls = urls
        self.params = params
        self.state = state
        self.stream, self.streams = stream, streams
        self.interleave = max(1, int(interleave))
        self.skips = skips
        self.max_bytes = max_bytes
        self._items: list[Item] | None = None
        self._readers: dict[int, Iterator[dict[str, Any]]] = {}
        self._gates: list[SkipGate] = []
        self._draws_key: tuple[int, int] | None = None
        self._draw_values: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------------
    def items(self) -> list[Item]:
        if self._items is None:
            self._items = self.state.items_of(self.params, self.stream, self.streams)
        return self._items

    def _draw(self) -> float:
        """The state's next uniform draw; a pure function of (seed, epoch, stream, streams, draw index)."""
        t = self.state.draws
        key = (self.state.epoch, t // _DRAW_BLOCK)
        if key != self._draws_key:
            seed = derive_seed(self.params.seed, self.state.epoch, self.stream, self.streams, key[1],
                               _DRAW_TAG)
            self._draw_values = np.random.default_rng(seed).random(_DRAW_BLOCK)
            self._draws_key = key
        self.state.draws = t + 1
        return float(self._draw_values[t % _DRAW_BLOCK])

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            close = getattr(reader, "close", None)
            if close is not None:
                close()
        self._readers = {}
        self._gates = []

    def shard_problems(self) -> int:
        """Shard-level problems this epoch's readers met, also those another reader counts (a strided
        item's phase > 0, blocks before a resume point): why an item ended without samples."""
        return sum(g.seen for g in self._gates)

    def next_in_epoch(self) -> dict[str, Any] | None:
        """The next raw sample of the current epoch, or None when the epoch's items are all exhausted."""
        state = self.state
        items = self.items()
        while True:
            while len(state.open) < self.interleave and state.opened < len(items):
                state.open.append([state.opened, items[state.opened].start])
                state.opened += 1
            if not state.open:
                return None
            slot = min(int(self._draw() * len(state.open)), len(state.open) - 1)
            index, progress = state.open[slot]
            reader = self._readers.get(index)
            if reader is None:
                item = items[index].with_start(progress)
                if progress == 0 and item.phase == 0:
                    # a shard read, counted once per shard per epoch as its problems are (see item_samples):
                    # an open item with progress 0 was never read (a read takes a sample or ends the item)
                    state.shards += 1
                gate = SkipGate(self.skips)
                self._gates.append(gate)
                reader = item_samples(self.urls[item.shard], item, gate, self.max_bytes)
                self._readers[index] = reader
            sample = next(reader, None)
            if sample is None:
                del state.open[slot]
                self._readers.pop(index, None)
                continue
            state.open[slot][1] = progress + 1
            state.offset += 1
            return sample

    def next_epoch(self) -> None:
        """Move to the following epoch: its explicit items if a re-deal left some, else the fresh plan."""
        self._close_readers()
        state = self.state
        state.epoch += 1
        state.items = state.later.pop(state.epoch, None)
        state.opened, state.open, state.draws, state.offset = 0, [], 0, 0
        self._items = None

    def at_epoch_start(self) -> bool:
        return self.state.opened == 0 and self.state.draws == 0
