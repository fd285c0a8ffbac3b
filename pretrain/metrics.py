"""Run metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Rank 0 writes; other ranks get a writer that does nothing, so call sites need no rank checks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(row, sort_keys=False) + "\n")
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
