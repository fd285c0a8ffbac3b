"""Run metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, mirrored to TensorBoard.

Each step is in the file once: a resume drops the rows logged after its checkpoint's step (a crash logs
steps it never saved; they are trained and logged again), and TensorBoard purges the same steps."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint.tensor_files import write_text_atomic

log = logging.getLogger("mmpt.train")


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (inf, -inf, nan) replaced by None, in nested dicts and lists too:
    JSON has no Infinity or NaN, and strict parsers (jq, JavaScript's JSON.parse) reject the whole line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


DROPPED = "metrics.dropped.jsonl"
"""Beside metrics.jsonl: the rows a resume took out of it, appended (what it trains again, or, after a resume
that found no checkpoint, an earlier history), so no logged row is ever lost."""


def truncate_after(path: str | Path, step: int, val_at_step: bool = True) -> int:
    """Keep the rows of a metrics.jsonl whose `step` is <= `step` (validation rows of those steps included,
    but not the validation row at `step` itself when not `val_at_step`: the checkpoint says its validation
    was skipped, so such a row came from an earlier resume's catch-up validation, which this one runs again)
    and return how many were dropped: the ones a crashed run logged after the checkpoint a resume starts
    from, and a line a kill cut short. Rewritten through a temporary file and a rename, so a kill during
    the rewrite leaves the old file whole; untouched when there is nothing to drop."""
    path = Path(path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    kept, gone, dropped = [], [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a partial line: the process died while writing it
            dropped += 1
            gone.append(line)
            continue
        at = row.get("step") if isinstance(row, dict) else None
        is_val = isinstance(row, dict) and any(str(k).startswith("val/") for k in row)
        if isinstance(at, int) and not isinstance(at, bool) and at <= step and not (
                at == step and is_val and not val_at_step):
            kept.append(line)
        else:
            dropped += 1
            gone.append(line)
    if not dropped and (not text or text.endswith("\n")):
        return 0
    if gone:  # kept beside it, never deleted: a resume that found no checkpoint (a wrong checkpoint.dir)
        with path.with_name(DROPPED).open("a", encoding="utf-8") as fh:  # drops a whole run's history
            fh.write("".join(line + "\n" for line in gone))
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsWriter:
    """Rank 0 writes; other ranks get a writer that does nothing, so call sites need no rank checks.

    `resume_step`: the step a resume starts after. The rows and TensorBoard events of later steps are
    dropped first, so the steps trained again are not in the file twice; with `val_pending` (the
    checkpoint's validation was skipped by a stop and runs again now) that step's validation row too."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, val_pending: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                dropped = truncate_after(self.path, resume_step, val_at_step=not val_pending)
                if dropped:
                    log.info("%s: moved %d row(s) logged after step %d, which this resume trains again, "
                             "to %s", self.path, dropped, resume_step, DROPPED)
            self._fh = self.path.open("a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1  # events at steps >= purge go
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One row; non-finite floats are written as null (`finite_or_null`), TensorBoard gets them as
        they are."""
        if not self.enabled:
            return
        row = finite_or_null({"step": step, "time": round(time.time(), 3), **values})
        self._fh.write(json.dumps(row, sort_keys=False, allow_nan=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if "/" in k:  # already grouped: val/zeroshot_top1 ...
                        self._tb.add_scalar(k, v, step)
                        continue
                    group = "loss" if k.startswith("loss") else "train"
                    self._tb.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.flush()
                self._tb.close()


class ProgressBar:
    """Rank 0's tqdm bar. While it is open, log lines go through `tqdm.write` (printed above the bar,
    which is then redrawn) instead of straight to stderr, where they would land in the middle of the
    bar's line; `close()` restores the handlers."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def step(self, loss: float | None = None) -> None:
        """One optimizer step done; one redraw (the postfix does not redraw by itself). The loss comes only
        at log steps: reading it every step would make the host wait for the device."""
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        self._redirect.__exit__(None, None, None)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of RUN_DIR/metrics.jsonl (for tests, the demo summary and users' scripts)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
