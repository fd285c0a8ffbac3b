"""What a training stream does after an epoch that gave it no usable sample.

A stream (one DataLoader worker of one rank) must deliver batches or fail: the DataLoader serves its
workers in turn, so the rank's next batch waits for this stream, and every other rank waits for that rank in
its next collective. A stream that neither delivers nor fails hangs the whole job. It must not fail either
for a data problem that `data.max_bad_fraction` is there to judge: that check runs on run-wide totals and
stops every rank at the same step, and a stream's skips only reach those totals with its next batch.

An epoch whose items gave no usable sample is one of three kinds:

* **starved, with a plan that varies** (shuffled epochs, resampling): the items were read, but every shard
  was unreadable or every sample was skipped. The stream goes on to its next epoch, which deals it other
  shards; what it skipped reaches the run-wide totals (and the bad-fraction check) with its next batch.
  Only a run of starved epochs that is next to impossible unless far more than `data.max_bad_fraction` of
  the shards is bad (odds under 1e-12 at that fraction, and at least 3) ends the stream, with a
  `DataQualityError`: the data is too bad to train on and the stream would otherwise spin without end.
* **starved, with a fixed plan** (`data.sampling=epoch` with `data.shard_shuffle=false` or a single
  stream, or one shard): the same shards come back every epoch, so the stream can never deliver, whatever
  the run-wide fraction.
  After 3 epochs in a row (a failing `pipe:` or http shard may recover) it raises a `DataQualityError`
  naming the shards. With shards bad from the start that happens before its rank's first batch, so the job
  stops at its first step: the other ranks' first collective fails as soon as this rank exits.
* **structural**: nothing was wrong with the shards, the items just hold no sample (every m-th sample of a
  shard with fewer samples than there are streams, or tars without `KEY.ext` members): a `RuntimeError`
  after 3 epochs in a row, naming that cause.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .cursor import StreamCursor
from .plan import Item, PlanParams, StreamState
from .stats import DataQualityError, SkipCounter

logger = logging.getLogger("data_pipelines")

MAX_EMPTY_EPOCHS = 3
"""Structural empty epochs (or starved ones under a fixed plan) in a row before a stream gives up."""
_ODDS = 1e-12


def starved_limit(max_bad_fraction: float) -> int:
    """Starved epochs in a row after which a stream gives up under a varying plan: the run's odds are below
    1e-12 when no more than `max_bad_fraction` of the shard reads fail (each starved epoch needs all of its
    items bad); a fraction over 0.9 (1 disables the check) counts as 0.9, so all-bad data still ends."""
    fraction = min(max(float(max_bad_fraction), 1e-6), 0.9)
    return max(MAX_EMPTY_EPOCHS, math.ceil(math.log(_ODDS) / math.log(fraction)))


def fixed_plan(params: PlanParams, streams: int) -> str:
    """Why every fresh epoch deals a stream the same shards (so a starved stream stays starved); "" when
    the shards it gets change from epoch to epoch."""
    if params.num_shards == 1:
        return "data.train has a single shard"
    if params.sampling == "epoch" and not params.shard_shuffle:
        return "data.shard_shuffle=false"
    if params.sampling == "epoch" and streams == 1:
        return "a single stream reads every shard in every epoch"
    return ""


class EmptyEpochs:
    """Watches one stream's epochs (`begin` before one, `end` after it) and acts on empty ones as the
    module docstring says."""

    def __init__(self, where: str, urls: list[str], params: PlanParams, streams: int,
                 max_bad_fraction: float) -> None:
        self.where = where
        self.urls = urls
        self.streams = streams
        self.fixed = fixed_plan(params, streams)
        self.limit = MAX_EMPTY_EPOCHS if self.fixed else starved_limit(max_bad_fraction)
        self.max_bad_fraction = max_bad_fraction
        self.structural = 0
        self.starved = 0
        self._fresh: list[Item] = []
        self._delivered = 0
        self._skipped = 0

    def begin(self, cursor: StreamCursor, state: StreamState, skips: SkipCounter) -> None:
        """Note where the epoch starts. Only its unread items (`start` 0) can show that a shard is empty or
        bad: an item re-dealt with `start > 0` after an elastic resume had samples, and may have none
        left (the old stream read it to the end without reaching the tar's end), so an epoch of only such
        items is a resumed part, not judged, and they are left out of the names in any warning."""
        unread = [i for i in cursor.items() if i.start == 0]
        self._fresh = unread if cursor.at_epoch_start() else []
        self._delivered, self._skipped = state.delivered, skips.problems

    def end(self, cursor: StreamCursor, state: StreamState, skips: SkipCounter) -> None:
        """Call after the epoch's last sample, before `cursor.next_epoch()`; raises when giving up."""
        if state.delivered > self._delivered:
            self.structural = self.starved = 0
            return
        if not self._fresh:  # a resumed part of an epoch: too little to judge
            return
        items = self._fresh
        shards = sorted({self.urls[i.shard] for i in items})
        names = f"{shards[:4]}{'...' if len(shards) > 4 else ''}"
        if skips.problems > self._skipped or cursor.shard_problems():
            self.structural = 0
            self.starved += 1
            self._starved(state, skips, names)
            return
        self.structural += 1
        stride = max(i.stride for i in items)
        if stride > 1:
            cause = (f"each is every {stride}th sample of a shard, and shard(s) {names} hold fewer samples "
                     f"than the {self.streams} streams (ranks x data.workers): lower data.workers or the "
                     f"number of ranks, or write more samples per shard")
        else:
            cause = (f"shard(s) {names} hold no samples (no KEY.ext members): check them with `pretrain data "
                     f"inspect`")
        msg = (f"[{self.where}] no sample at all in epoch {state.epoch} from {len(items)} item(s), and "
               f"nothing was skipped: {cause}")
        if self.structural >= MAX_EMPTY_EPOCHS:
            raise RuntimeError(f"{msg} ({self.structural} epochs in a row, giving up)")
        logger.warning(msg)

    def _starved(self, state: StreamState, skips: SkipCounter, names: str) -> None:
        counts: dict[str, Any] = skips.as_dict()
        msg = (f"[{self.where}] no usable sample in epoch {state.epoch} from shard(s) {names}: every shard "
               f"was unreadable or every sample skipped (skips so far: {counts})")
        if self.starved >= self.limit:
            if self.fixed:
                shuffle = ", or set data.shard_shuffle=true" if "shard_shuffle" in self.fixed else ""
                raise DataQualityError(
                    f"{msg}; {self.starved} epochs in a row, and each epoch deals this stream the same "
                    f"shard(s) ({self.fixed}), so it can never feed its rank whatever share of the data is "
                    f"bad: repair or remove them (`pretrain data inspect`){shuffle}")
            raise DataQualityError(
                f"{msg}; {self.starved} epochs in a row, which is next to impossible unless far more than "
                f"data.max_bad_fraction={self.max_bad_fraction:g} of the shards is unusable: check "
                f"data.train with `pretrain data inspect`")
        if self.starved & (self.starved - 1) == 0:  # 1, 2, 4, 8...: a spinning stream does not flood the log
            logger.warning("%s; going on with the next epoch (%d in a row, giving up after %d)", msg,
                           self.starved, self.limit)
