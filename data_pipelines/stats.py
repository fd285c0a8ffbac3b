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
IMAGE_TOO_LARGE = "image_too_large"
TOO_LARGE = "too_large"  # more bytes than data.max_sample_bytes (tar members of a sample, a fetched image)
FETCH_FAILED = "fetch_failed"  # importers only: an image URL could not be downloaded
BAD_SHARD = "bad_shard"
DUPLICATE_MEMBER = "duplicate_member"  # no longer produced by the reader (see DUPLICATE_KEY); kept as a name
DUPLICATE_KEY = "duplicate_key"  # a key repeated right after itself: the repeat is read as a new sample, kept
DOTTED_KEY = "dotted_key"  # `photo.0001.jpg` + `.txt`: key `photo.0001` holds a '.' (see shardstream): kept
DOTTED_KEY_MERGED = "dotted_key_merged"  # `K.X.ext` members, several X, no plain `K.ext`: read as one sample
BAD_NEGATIVE = "bad_negative"  # a `neg.txt` member that is not UTF-8 or holds no caption: the sample is kept
MISSING_NEGATIVE = "missing_negative"  # no `neg.txt` while objectives.itm.caption_negatives wants one: kept
MISSING_LABEL = "missing_label"  # no `.cls` where the reader is a classifier's (fine-tune, its eval)
BAD_LABEL = "bad_label"  # a `.cls` that is not a non-negative integer, where the reader is a classifier's

TOO_LARGE_KEY = "__too_large__"
"""Set (to why) in a raw sample whose tar members exceed data.max_sample_bytes (see `shardstream`)."""

SAMPLE_REASONS: tuple[str, ...] = (MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_IMAGE, BAD_TEXT,
                                   IMAGE_TOO_LARGE, TOO_LARGE, MISSING_LABEL, BAD_LABEL)
"""Reasons that each lose one sample (bad_shard loses the rest of a shard, duplicate_key nothing)."""
KEPT_REASONS: tuple[str, ...] = (DUPLICATE_MEMBER, DUPLICATE_KEY, DOTTED_KEY, BAD_NEGATIVE, MISSING_NEGATIVE)
"""Problems counted (and logged) on a sample that is still trained on: only an optional part was lost."""


class SkipCounter:
    """Counts skipped samples (and unreadable shards) by reason and warns at a limited rate.

    The first `first_warnings` problems are logged one by one (with detail, to help find the cause); after
    that at most one summary line per `min_interval_s` seconds.
    """

    kept: tuple[str, ...] = KEPT_REASONS
    """Reasons logged as "counted, sample kept" rather than "skipped" (a counter may know more of them)."""

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
            what = "counted, sample kept" if reason in self.kept else "skipped"
            logger.warning("%s%s (%s)%s", prefix, what, reason, f": {detail}" if detail else "")
            if self._warned == self.first_warnings:
                logger.warning("%sfurther skips are summarised at most every %.0f s", prefix,
                               self.min_interval_s)
            return
        now = time.monotonic()
        if now - self._last_summary >= self.min_interval_s:
            self._last_summary = now
            logger.warning("%sskipped so far: %s (latest: %s%s)", prefix, self.as_dict(), reason,
                           f": {detail}" if detail else "")

    def restore(self, counts: dict[str, int]) -> None:
        """Continue from counts saved in a checkpoint (totals stay run-wide across resumes)."""
        self._counts = {str(k): int(v) for k, v in counts.items()}
        self._warned = min(self.first_warnings, self.total)

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def problems(self) -> int:
        """The counts that lost something (`total` less the `kept` reasons, e.g. `dotted_key`): what tells
        an epoch without a sample that its data was bad (`empty_epochs`)."""
        return sum(v for k, v in self._counts.items() if k not in self.kept)

    def as_dict(self) -> dict[str, int]:
        """A copy of the counts, reason -> number, sorted by reason for stable logs."""
        return dict(sorted(self._counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter({self.where!r}, {self.as_dict()})"


class SkipGate(SkipCounter):
    """The counter one reader of a shard counts into, forwarding to the stream's `target` only while
    `counting` is set; its own counts are everything it saw.

    Shard-level problems (`bad_shard`, `duplicate_key`) are found by whoever reads the shard's bytes, and
    a shard is read more than once per epoch when it is split into strided items or re-read up to a resume
    point. Only the reader that accounts for a stretch of the shard turns `counting` on for it, so each
    problem is counted once per shard per epoch; `seen` (what the gate got, counted or not) still tells a
    reader that its shard was bad.
    """

    def __init__(self, target: SkipCounter, counting: bool = True) -> None:
        super().__init__(where=target.where, first_warnings=0, min_interval_s=float("inf"))
        self.target = target
        self.counting = counting

    def skip(self, reason: str, detail: str = "") -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if self.counting:
            self.target.skip(reason, detail)

    @property
    def seen(self) -> int:
        """Problems this reader met, counted in `target` or not (kept reasons such as `duplicate_key` are
        no sign of a bad shard)."""
        return self.problems


class DataQualityError(RuntimeError):
    """Too much of the data is unusable to keep training (see `data.max_bad_fraction`)."""


def bad_fractions(skips: dict[str, int], delivered: int, shards: int) -> tuple[float, float]:
    """(skipped samples / samples read, bad shards / shards opened), 0 where nothing was read yet."""
    bad = sum(int(skips.get(r, 0)) for r in SAMPLE_REASONS)
    samples = bad + int(delivered)
    bad_shards = int(skips.get(BAD_SHARD, 0))
    return (bad / samples if samples else 0.0, bad_shards / shards if shards else 0.0)


def check_bad_fraction(skips: dict[str, int], delivered: int, shards: int, max_fraction: float,
                       min_samples: int) -> None:
    """Raise `DataQualityError` once at least `min_samples` samples were read and more than
    `max_fraction` of samples (or of shards opened) were unusable.

    Called with run-wide totals on every rank at the same step, so all ranks stop together instead of
    some hanging in a collective.
    """
    if max_fraction >= 1.0:
        return
    bad = sum(int(skips.get(r, 0)) for r in SAMPLE_REASONS)
    read = bad + int(delivered)
    sample_frac, shard_frac = bad_fractions(skips, delivered, shards)
    if read >= min_samples and (sample_frac > max_fraction or shard_frac > max_fraction):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skips.items()) if v)
        raise DataQualityError(
            f"aborting: {bad} of {read} samples ({sample_frac:.1%}) and {skips.get(BAD_SHARD, 0)} of "
            f"{shards} shard reads ({shard_frac:.1%}) were unusable, above "
            f"data.max_bad_fraction={max_fraction:g} (skipped by reason: {reasons or 'none'}); check "
            f"data.train with `pretrain data inspect`, or raise data.max_bad_fraction")
