"""`pretrain data inspect`: what is in a set of shards, and what training would skip, by reason.

Each sample goes through the same checks as training (byte limit, members present, caption UTF-8 and
non-empty, pixel limit, image decodes) so the report predicts the skip counts a run will log; with
`labels` those of a classifier's run (`train.task=classify`: image + `.cls` class index, no caption
needed). Images are decoded at a reduced JPEG scale (the entropy-coded data is still read, so truncation is
still caught), which makes a full check of a shard about as fast as reading it. Shards are inspected in
parallel, one per task.
"""

from __future__ import annotations

import collections
import multiprocessing
import sys
from typing import Any

from .decode import decode_image, negative_caption_of, sample_parts
from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .shardstream import shard_samples
from .stats import KEPT_REASONS, SkipCounter
from .urls import expand_sources

_EXAMPLES = 5


def _check_view(img: Any) -> Any:
    if img.format == "JPEG":
        img.draft("RGB", (max(img.size[0] // 8, 1), max(img.size[1] // 8, 1)))
    return img


class _Examples(SkipCounter):
    """A SkipCounter that also keeps the first few details of each reason, for the report."""

    def __init__(self, where: str) -> None:
        super().__init__(where=where, first_warnings=0, min_interval_s=float("inf"))
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < _EXAMPLES:
            kept.append(detail[:300])


def inspect_shard(url: str, decode: bool = True, max_image_pixels: int = 89478485,
                  max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES, labels: bool = False) -> dict[str, Any]:
    """Counts for one shard: samples, good ones, extensions, keys, and skips by reason with examples.

    Oversized members (over `max_sample_bytes`) are skipped without being read, as training does.
    `labels`: check as a classifier reads (`decode.sample_parts(captions=False, labels=True)`)."""
    skips = _Examples(where=url)
    extensions: collections.Counter = collections.Counter()
    keys: list[str] = []
    good = 0
    for sample in shard_samples([url], skips, max_bytes=max_sample_bytes):
        keys.append(sample["__key__"])
        extensions.update(k for k in sample if not k.startswith("__"))
        parts = sample_parts(sample, skips, captions=not labels, labels=labels)
        if parts is None:
            continue
        if decode and decode_image(parts[0], sample["__key__"], skips, _check_view, max_image_pixels) is None:
            continue
        if not labels:  # an unreadable optional neg.txt: counted, the sample kept (classifiers never read it)
            negative_caption_of(sample, 0, skips)
        good += 1
    return {"url": url, "samples": len(keys), "good": good, "extensions": dict(extensions),
            "bad": skips.as_dict(), "examples": skips.examples, "keys": keys}


def _inspect_args(args: tuple[str, bool, int, int, bool]) -> dict[str, Any]:
    return inspect_shard(*args)


def inspect_shards(spec: str, decode: bool = True, max_image_pixels: int = 89478485,
                   workers: int = 0, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
                   labels: bool = False) -> dict[str, Any]:
    """Report over every shard of `spec` (brace / `::` / pipe: / http); see the module docstring."""
    urls = [u for source in expand_sources(spec) for u in source]
    tasks = [(u, decode, max_image_pixels, max_sample_bytes, labels) for u in urls]
    if workers > 0 and len(urls) > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(workers, len(urls))) as pool:
            shards = pool.map(_inspect_args, tasks, chunksize=1)
    else:
        shards = [_inspect_args(t) for t in tasks]
    extensions: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = {}
    key_counts: collections.Counter = collections.Counter()
    for shard in shards:
        extensions.update(shard["extensions"])
        bad.update(shard["bad"])
        key_counts.update(shard.pop("keys"))
        for reason, found in shard.pop("examples").items():
            examples.setdefault(reason, [])
            examples[reason] += found[:_EXAMPLES - len(examples[reason])]
    duplicates = sorted(k for k, c in key_counts.items() if c > 1)
    samples = sum(s["samples"] for s in shards)
    good = sum(s["good"] for s in shards)
    return {
        "shards": len(shards), "samples": samples, "good": good, "bad_total": samples - good,
        "bad": dict(sorted(bad.items())), "bad_examples": examples,
        "extensions": dict(sorted(extensions.items())),
        "keys": {"unique": len(key_counts), "duplicated": len(duplicates), "duplicate_examples":
                 duplicates[:_EXAMPLES]},
        "decoded": decode, "labels": labels, "per_shard": shards,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of `inspect_shards` output."""
    lines = [f"{report['shards']} shard(s), {report['samples']} samples, {report['good']} usable, "
             f"{report['bad_total']} would be skipped"
             + ("" if report["decoded"] else " (images not decoded)")
             + (" as a classifier reads them (image + .cls)" if report.get("labels") else "")]
    lines.append("extensions: " + ", ".join(f"{k}={v}" for k, v in report["extensions"].items()))
    keys = report["keys"]
    lines.append(f"keys: {keys['unique']} unique, {keys['duplicated']} duplicated"
                 + (f" (e.g. {', '.join(keys['duplicate_examples'])})" if keys["duplicated"] else ""))
    for reason, count in report["bad"].items():
        example = report["bad_examples"].get(reason, [""])[:1]
        kept = " (sample kept)" if reason in KEPT_REASONS else ""
        detail = f"  e.g. {example[0]}" if example and example[0] else ""
        lines.append(f"  {reason}: {count}{kept}{detail}")
    for shard in report["per_shard"]:
        if shard["bad"].get("bad_shard"):
            lines.append(f"  unreadable, truncated or with data past its end: {shard['url']}")
    return "\n".join(lines)
