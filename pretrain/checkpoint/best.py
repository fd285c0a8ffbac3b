"""`checkpoint.keep_best`: which checkpoint scored best on a validation metric, kept through retention.

`<checkpoint dir>/best.json` names it: {"metric", "value", "step", "tag"}. Rank 0 writes it (atomically)
after the checkpoint of a new best is published and before old checkpoints are pruned, so the file never
names a checkpoint that retention already removed, and `prune` keeps the one it names.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from parallel import groups

BEST = "best.json"
log = logging.getLogger("mmpt.train")


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


def validate_pending(metric: str | None, start: Any, step: int, tag: str, validator: Any, metrics: Any,
                     root: Path) -> None:
    """A stop request at a validation step skipped it (to stop fast) and saved `val_pending` with the
    checkpoint; the resume starts at the step after, so without this that validation point (and its
    `checkpoint.keep_best` candidacy) would be lost for good. The weights are exactly that step's: validate
    now and log the row at `step`, as the uninterrupted run did. best.json may name the resumed checkpoint
    when it is this run's own (`<root>/global_step<step>`). Old checkpoints lack the key: nothing runs.
    `metric`: checkpoint.keep_best; `start`: the training loop's resolved start point; `tag`: `step`'s."""
    if start.client is None or not start.client.get("val_pending") or not validator.due(step):
        return
    val = validator.run(step)  # every rank (collectives)
    metrics.log(step, val)
    own = start.target is not None and Path(start.target[0]).resolve() == Path(root).resolve() \
        and start.target[1] == tag
    if groups.rank() == 0 and metric and own and improves(root, metric, val.get(metric)):
        try:
            record_best(root, metric, val[metric], step, tag)
        except OSError as e:  # as after a save: the checkpoint is there, only the note about it is missing
            log.warning("recording %s/%s as the best checkpoint: %s", root, tag, e)
