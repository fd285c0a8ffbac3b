"""`checkpoint.keep_best`: which checkpoint scored best on a validation metric, kept through retention.

`<checkpoint dir>/best.json` names it: {"metric", "value", "step", "tag"}. Rank 0 writes it (atomically)
after the checkpoint of a new best is published and before old checkpoints are pruned, so the file never
names a checkpoint that retention already removed, and `prune` keeps the one it names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

BEST = "best.json"


def lower_is_better(metric: str) -> bool:
    """Losses (`val/loss`, `val/loss_mlm`, ...) improve downwards; accuracies and recalls upwards."""
    return metric.split("/", 1)[-1].startswith("loss")


def read_best(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / BEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def best_tag(root: str | Path) -> str | None:
    best = read_best(root)
    return None if best is None else best.get("tag")


def improves(root: str | Path, metric: str, value: float | None) -> bool:
    """Whether `value` of `metric` beats the recorded best (a missing or different-metric record loses)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    best = read_best(root)
    if best is None or best.get("metric") != metric or best.get("value") is None:
        return True
    return value < best["value"] if lower_is_better(metric) else value > best["value"]


def record_best(root: str | Path, metric: str, value: float, step: int, tag: str) -> None:
    """Write best.json through a temporary file and a rename (readers never see half of it)."""
    path = Path(root) / BEST
    tmp = path.with_name(f".{BEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"metric": metric, "value": value, "step": step, "tag": tag}, indent=1))
    os.replace(tmp, path)
