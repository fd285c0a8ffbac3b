"""Counting of skipped samples, so data problems are visible in the metrics instead of silently lost.

A long run over web-scale shards always meets some broken samples; crashing on them is wrong, but dropping
them without a trace hides a bad shard or a decoding bug. `SkipCounter` keeps a count per reason and logs a
warning at a limited rate so a shard full of garbage cannot flood the logs.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("data_pipelines")

MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
BAD_IMAGE = "bad_image"
BAD_TEXT = "bad_text"
BAD_SHARD = "bad_shard"
DUPLICATE_MEMBER = "duplicate_member"


class SkipCounter:
    """Counts skipped samples (and unreadable shards) by reason and warns at a limited rate.

    The first `first_warnings` problems are logged one by one (with detail, to help find the cause); after
    that at most one summary line per `min_interval_s` seconds.
    """

    def __init__(self, where: str = "", first_warnings: int = 5, min_interval_s: float = 60.0) -> None:
        self.where = where
        self.first_warnings = first_warnings
        self.min_interval_s = min_interval_s
        self._counts: dict[str, int] = {}
        self._warned = 0
        self._last_summary = float("-inf")

    def skip(self, reason: str, detail: str = "") -> None:
        """Record one problem of kind `reason`; `detail` (key, URL, exception) only goes to the log."""
        self._counts[reason] = self._counts.get(reason, 0) + 1
        prefix = f"[{self.where}] " if self.where else ""
        if self._warned < self.first_warnings:
            self._warned += 1
            logger.warning("%sskipped (%s)%s", prefix, reason, f": {detail}" if detail else "")
            if self._warned == self.first_warnings:
                logger.warning("%sfurther skips are summarised at most every %.0f s", prefix,
                               self.min_interval_s)
            return
        now = time.monotonic()
        if now - self._last_summary >= self.min_interval_s:
            self._last_summary = now
            logger.warning("%sskipped so far: %s (latest: %s%s)", prefix, self.as_dict(), reason,
                           f": {detail}" if detail else "")

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """A copy of the counts, reason -> number, sorted by reason for stable logs."""
        return dict(sorted(self._counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter({self.where!r}, {self.as_dict()})"
