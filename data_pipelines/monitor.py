"""Run-wide data-quality totals for the trainer: skips by reason, samples delivered, shards opened.

Counts travel inside the stream state (`_position`), so they are cumulative across resumes and layout
changes. The trainer gathers each rank's `local_totals` (it owns the collectives), `merge_totals` them and
logs `metrics_row`; `check_bad_fraction` runs on the merged totals on every rank at the same step, so a
data-quality abort stops all ranks together.
"""

from __future__ import annotations

from typing import Any

from .position import PositionTracker
from .stats import SAMPLE_REASONS, bad_fractions


def local_totals(tracker: PositionTracker) -> dict[str, Any]:
    """This rank's totals over its workers, as of the batches it consumed."""
    total: dict[str, Any] = {"skips": {}, "delivered": 0, "shards": 0}
    for counts in tracker.skip_counts().values():
        total["delivered"] += counts["delivered"]
        total["shards"] += counts["shards"]
        for reason, n in counts["skips"].items():
            total["skips"][reason] = total["skips"].get(reason, 0) + int(n)
    return total


def merge_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of several `local_totals` (one per rank)."""
    out: dict[str, Any] = {"skips": {}, "delivered": 0, "shards": 0}
    for part in parts:
        out["delivered"] += int(part["delivered"])
        out["shards"] += int(part["shards"])
        for reason, n in part["skips"].items():
            out["skips"][reason] = out["skips"].get(reason, 0) + int(n)
    out["skips"] = dict(sorted(out["skips"].items()))
    return out


def metrics_row(totals: dict[str, Any]) -> dict[str, Any]:
    """Flat scalars for metrics.jsonl / TensorBoard: `skipped` (samples), `skip_<reason>` for every reason
    seen (and every sample reason, as 0, so the TensorBoard curves exist from the start), fractions."""
    skips = totals["skips"]
    sample_frac, shard_frac = bad_fractions(skips, totals["delivered"], totals["shards"])
    row: dict[str, Any] = {"skipped": int(sum(skips.get(r, 0) for r in SAMPLE_REASONS))}
    for reason in sorted(set(SAMPLE_REASONS) | set(skips)):
        row[f"skip_{reason}"] = int(skips.get(reason, 0))
    row["bad_sample_frac"] = round(sample_frac, 6)
    row["bad_shard_frac"] = round(shard_frac, 6)
    return row
