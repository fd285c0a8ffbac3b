"""The data position a checkpoint stores, and where each stream restarts from it -- under any layout.

Every batch carries its stream's `StreamState` (`_position`) as of the moment the batch was completed. The
trainer feeds each *consumed* batch to `PositionTracker.update` (prefetched ones are not counted), and
`PositionTracker.state()` is this rank's checkpoint entry: every stream's state, the layout, the plan
parameters and the number of batches consumed under this layout (PyTorch's DataLoader serves workers
round-robin starting from worker 0, so after k batches actual worker a must play stream (a + k) % workers).

`start_states` turns the list of all ranks' entries into this rank's streams' start states:

* same layout and plan (world size, data.workers, shards, seed, shuffle, block): each stream continues
  from its own saved state, so the resumed run yields the very batches the uninterrupted one would have;
* anything else (2 -> 1 ranks, 1 -> 4 workers, a new seed or shuffle buffer): the unconsumed remainder of
  every epoch in progress is recovered as work items and re-dealt to the new streams (`plan.redeal`);
  later epochs start fresh under the new layout. Exactly the unseen samples are read, none twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

from .plan import PlanParams, StreamState, redeal, remaining_work

logger = logging.getLogger("data_pipelines")

POSITION_VERSION = 2


def streams_for(workers: int) -> int:
    """Number of independent sample streams per rank: one per worker, one when loading in-process."""
    return max(int(workers), 1)


def stream_index(rank: int, world: int, worker: int) -> int:
    """Global stream number of (rank, worker): fresh epochs give it shards[rank::world][worker::workers]."""
    return rank + world * worker


def shards_fingerprint(urls: list[str]) -> str:
    """A short digest of the shard file names (not directories, so moved data still matches)."""
    names = "\n".join(u.rstrip("/").rsplit("/", 1)[-1] for u in urls)
    return hashlib.blake2b(names.encode("utf-8"), digest_size=8).hexdigest()


def _normalise(position: dict[str, Any] | list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """All saved rank entries by their data-parallel rank (duplicates from tensor-parallel peers merged)."""
    entries = [position] if isinstance(position, dict) else list(position)
    if not entries:
        raise ValueError("data position: the checkpoint holds no rank positions")
    by_rank: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"data position entries must be dicts, got {type(entry).__name__}")
        if entry.get("version") != POSITION_VERSION:
            raise ValueError(
                f"data position has format version {entry.get('version')!r}, this mmpt reads version "
                f"{POSITION_VERSION}; the checkpoint was written by an older mmpt whose data position "
                f"cannot be mapped exactly (resume from a newer checkpoint)")
        needed = ("rank", "world", "num_workers", "batches", "params", "workers")
        missing = [k for k in needed if k not in entry]
        if missing:
            raise ValueError(f"data position is missing {', '.join(missing)}")
        by_rank.setdefault(int(entry["rank"]), entry)
    worlds = {int(e["world"]) for e in by_rank.values()}
    workers = {int(e["num_workers"]) for e in by_rank.values()}
    params = {json.dumps(e["params"], sort_keys=True) for e in by_rank.values()}
    if len(worlds) != 1 or len(workers) != 1 or len(params) != 1:
        raise ValueError("data position: ranks disagree on world size, workers or plan parameters")
    (world,) = worlds
    if isinstance(position, list) and sorted(by_rank) != list(range(world)):
        raise ValueError(f"data position: expected entries for ranks 0..{world - 1}, got {sorted(by_rank)}")
    return by_rank


def start_states(
    params: PlanParams,
    fingerprint: str,
    rank: int,
    world: int,
    workers: int,
    position: dict[str, Any] | list[dict[str, Any]] | None,
) -> tuple[dict[int, StreamState], int]:
    """({worker: start state}, batches already consumed under this layout) for `rank` of `world`.

    `position` is the checkpoint's `data_positions` list (every rank's `PositionTracker.state()`), or one
    rank's entry when the layout is unchanged, or None for a fresh start.
    """
    streams = streams_for(workers)
    n = world * streams
    if position is None:
        return {w: StreamState() for w in range(streams)}, 0
    by_rank = _normalise(position)
    sample = next(iter(by_rank.values()))
    saved_params = PlanParams.from_dict(sample["params"])
    saved_world, saved_streams = int(sample["world"]), int(sample["num_workers"])
    if saved_params.num_shards != params.num_shards:
        raise ValueError(
            f"cannot resume the data stream: the checkpoint's position covers {saved_params.num_shards} "
            f"shards but data.train now expands to {params.num_shards}; resume with the same shard list")
    if sample.get("fingerprint") not in (None, fingerprint):
        logger.warning("data.train file names differ from the checkpoint's (shards were renamed or "
                       "reordered?); positions are matched by index")
    if (saved_world, saved_streams, saved_params) == (world, streams, params) and rank in by_rank:
        entry = by_rank[rank]
        states = {int(w): StreamState.from_dict(s) for w, s in dict(entry["workers"]).items()}
        if sorted(states) != list(range(streams)):
            raise ValueError(f"data position of rank {rank} names workers {sorted(states)}, expected "
                             f"0..{streams - 1}")
        return states, int(entry["batches"])
    if isinstance(position, dict) or sorted(by_rank) != list(range(saved_world)):
        raise ValueError(
            f"cannot resume the data stream: it was saved with {saved_world} ranks x {saved_streams} workers "
            f"and this run has {world} ranks x {streams} workers (or other plan parameters); an elastic "
            f"resume needs every rank's saved position (the checkpoint's data_positions list)")
    saved_n = saved_world * saved_streams
    old: dict[int, StreamState] = {}
    for r, entry in by_rank.items():
        for w, raw in dict(entry["workers"]).items():
            old[stream_index(r, saved_world, int(w))] = StreamState.from_dict(raw)
    if sorted(old) != list(range(saved_n)):
        raise ValueError(f"data position: expected {saved_n} saved streams, got {len(old)}")
    work = remaining_work(old, saved_params, saved_n)
    new = redeal(work, n)
    mine = {w: new[stream_index(rank, world, w)] for w in range(streams)}
    if rank == 0 and 0 in mine:  # keep run-wide totals: all earlier counts continue on one stream
        first = mine[0]
        for state in old.values():
            first.delivered += state.delivered
            first.shards += state.shards
            for reason, count in state.skips.items():
                first.skips[reason] = first.skips.get(reason, 0) + count
    if rank == 0:
        left = {e: len(items) for e, items in work.items()}
        logger.info("elastic data resume: %d ranks x %d workers -> %d x %d; unfinished items per epoch %s",
                    saved_world, saved_streams, world, streams, left)
    return mine, 0


class PositionTracker:
    """Follows consumed batches and produces this rank's resumable position for a checkpoint."""

    def __init__(self, params: PlanParams, fingerprint: str, rank: int, world: int, workers: int,
                 starts: dict[int, StreamState], batches: int = 0) -> None:
        self.params = params
        self.fingerprint = fingerprint
        self.rank, self.world = int(rank), int(world)
        self.num_workers = streams_for(workers)
        self.batches = int(batches)
        self.workers: dict[str, dict[str, Any]] = {str(w): s.as_dict(w) for w, s in starts.items()}

    def update(self, batch: dict[str, Any]) -> None:
        """Record the position after `batch` (call for every batch the trainer consumes, in order)."""
        pos = batch["_position"]
        self.workers[str(int(pos["worker"]))] = pos
        self.batches += 1

    def skip_counts(self) -> dict[int, dict[str, Any]]:
        """Per worker: {skips, delivered, shards} as of the last consumed batch (or the start state)."""
        return {int(w): {"skips": dict(p.get("skips", {})), "delivered": int(p.get("delivered", 0)),
                         "shards": int(p.get("shards", 0))} for w, p in self.workers.items()}

    def state(self) -> dict[str, Any]:
        """The position dict to save (JSON-compatible)."""
        return {
            "version": POSITION_VERSION,
            "rank": self.rank,
            "world": self.world,
            "num_workers": self.num_workers,
            "batches": self.batches,
            "params": self.params.as_dict(),
            "fingerprint": self.fingerprint,
            "workers": copy.deepcopy(dict(sorted(self.workers.items(), key=lambda kv: int(kv[0])))),
        }
