"""The data-stream position a checkpoint stores, so a resumed run continues at the exact next sample.

Each DataLoader worker is a deterministic stream (epoch shard split, seeded shuffle buffer), so its position
is just (epoch, raw samples taken out of the shuffle buffer). The trainer records the position carried by
each batch it actually consumed (prefetched batches are not counted) plus how many batches it consumed,
which fixes which worker PyTorch's round-robin must serve next.
"""

from __future__ import annotations

import copy
from typing import Any


def streams_for(workers: int) -> int:
    """Number of independent sample streams per rank: one per worker, one when loading in-process."""
    return max(int(workers), 1)


class PositionTracker:
    """Follows consumed batches and produces the resumable position dict for a checkpoint.

    Created with the saved position on resume, so workers that have not delivered a batch since the restart
    keep their saved place instead of falling back to the start.
    """

    def __init__(self, num_workers: int, world: int, position: dict[str, Any] | None = None) -> None:
        self.num_workers = streams_for(num_workers)
        self.world = int(world)
        self.workers: dict[str, dict[str, int]] = {}
        if position is not None:
            starts, _ = parse_position(position, self.world, self.num_workers)
            self.workers = {str(w): {"epoch": e, "offset": n} for w, (e, n) in starts.items()}

    def update(self, batch: dict[str, Any]) -> None:
        """Record the position after `batch` (call for every batch the trainer consumes, in order)."""
        pos = batch["_position"]
        self.workers[str(int(pos["worker"]))] = {"epoch": int(pos["epoch"]), "offset": int(pos["offset"])}

    def state(self, batches: int) -> dict[str, Any]:
        """The position dict to save; `batches` is how many batches this rank has consumed in total."""
        return {
            "workers": copy.deepcopy(dict(sorted(self.workers.items(), key=lambda kv: int(kv[0])))),
            "num_workers": self.num_workers,
            "world": self.world,
            "batches": int(batches),
        }


def parse_position(
    position: dict[str, Any], world: int, num_streams: int
) -> tuple[dict[int, tuple[int, int]], int]:
    """Validate a saved position against the current layout -> ({worker: (epoch, offset)}, batches)."""
    if not isinstance(position, dict):
        raise ValueError(f"data position must be a dict, got {type(position).__name__}")
    missing = [k for k in ("workers", "num_workers", "world", "batches") if k not in position]
    if missing:
        raise ValueError(f"data position is missing {', '.join(missing)}: {position!r}")
    saved_world, saved_workers = int(position["world"]), int(position["num_workers"])
    if saved_world != world or saved_workers != num_streams:
        raise ValueError(
            f"cannot resume the data stream: it was saved with {saved_world} ranks x {saved_workers} workers "
            f"but this run has {world} ranks x {num_streams} workers; resuming with a different world size "
            f"or data.workers is not supported yet (elastic resume)")
    batches = int(position["batches"])
    if batches < 0:
        raise ValueError(f"data position: batches must be >= 0, got {batches}")
    starts: dict[int, tuple[int, int]] = {}
    for key, entry in dict(position["workers"]).items():
        worker = int(key)
        if not 0 <= worker < num_streams:
            raise ValueError(f"data position names worker {key}, but there are {num_streams} workers")
        epoch, offset = int(entry["epoch"]), int(entry["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"data position of worker {key} has negative epoch/offset: {entry!r}")
        starts[worker] = (epoch, offset)
    return starts, batches
