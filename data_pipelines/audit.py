"""Key audit (`data.log_keys=true`): which samples each data-parallel rank actually trained on.

Each rank appends `epoch key step` for every sample of every batch it consumes to RUN_DIR/keys/rank{R}.txt.
On resume from step S, lines with step > S are dropped first (they were consumed after the checkpoint, by
a run that then died, and will be consumed again), so across any number of resumes and layout changes the
files hold exactly what the final model saw: "keys of (run to k, stop, resume to the end of the epoch) ==
keys of one epoch, none twice" can be checked from them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from .files import write_text_atomic

_RANK_FILE = re.compile(r"^rank(\d+)\.txt$")


class KeyRecord(NamedTuple):
    epoch: int
    key: str
    step: int
    rank: int


def keys_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "keys"


def truncate_after(path: Path, step: int) -> None:
    """Drop lines of an audit file whose step is greater than `step` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and int(line.rsplit(" ", 1)[1]) <= step]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class KeyAudit:
    """Writer of one rank's audit file; does nothing when disabled (call sites need no checks)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world: int, enabled: bool,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self._fh: TextIO | None = None
        if not enabled:
            return
        folder = keys_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}.txt"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
            if rank == 0:  # files of ranks that no longer exist after a layout change
                for other in folder.iterdir():
                    match = _RANK_FILE.match(other.name)
                    if match and int(match.group(1)) >= world:
                        truncate_after(other, resume_step)
        self._fh = self.path.open("a", encoding="utf-8")

    def record(self, batch: dict[str, Any], step: int) -> None:
        """Log the samples of a consumed `batch` that contributes to optimizer step `step`."""
        if self._fh is None:
            return
        epochs = batch.get("_epochs") or [batch["_position"]["epoch"]] * len(batch["_keys"])
        self._fh.write("".join(f"{e} {k} {step}\n" for e, k in zip(epochs, batch["_keys"])))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_keys(run_dir: str | os.PathLike) -> list[KeyRecord]:
    """Every audit line of a run, from all rank files (a key may contain spaces; epoch and step cannot)."""
    records = []
    folder = keys_dir(run_dir)
    if not folder.is_dir():
        return []
    for path in sorted(folder.iterdir()):
        match = _RANK_FILE.match(path.name)
        if not match:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                epoch, rest = line.split(" ", 1)
                key, step = rest.rsplit(" ", 1)
                records.append(KeyRecord(int(epoch), key, int(step), int(match.group(1))))
    return records
