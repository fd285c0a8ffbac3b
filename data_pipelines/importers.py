"""Importers: image-caption data from a folder, CSV/TSV, Parquet or existing WebDataset shards -> shards.

Every source (`import_sources`, `import_csv`) is turned into a stream of small *records* (key, image
reference or bytes, caption, extra members) in a deterministic order; a pool of worker processes loads and
checks each record (reads or fetches the image through `openers`, checks the byte limit, the header, the
pixel limit and the caption exactly as training will) and the main process writes the results in input
order, so the output shards do not depend on the worker count.
At most a few chunks per worker are in flight, so a Parquet file of image bytes is never all in memory.

Written per import: `OUT/{prefix}-NNNNNN.tar` (plain tar, KEY.jpg|png|webp + KEY.txt + KEY.json with the
source reference; with `--labels`, classifier data, KEY.cls with or without KEY.txt), `sizes.json`
(samples per shard, read by the loader's start-up checks) and `stats.json` (samples and bytes per shard,
skipped samples by reason with examples). Image bytes are copied unchanged (an EXIF orientation too, which
training applies); formats other than JPEG/PNG/WebP are re-encoded once as PNG, upright, so training can
read them. OUT is checked and written through a staging folder (`import_output`): a failed import leaves
OUT as it was.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from .decode import (
    IMAGE_KEYS,
    LABEL_KEY,
    TRANSPOSES,
    displayed_size,
    exif_orientation,
    honour_pixel_limit,
    label_of,
    to_8bit,
)
from .import_csv import csv_records
from .import_options import ImportOptions
from .import_output import Staging, check_out, check_prefix
from .import_sources import (
    DUPLICATE_IMAGE,
    IMAGE_SUFFIXES,
    Lazy,
    Record,
    folder_records,
    parquet_records,
    safe_key,
    source_paths,
    wds_records,
)
from .openers import SampleTooLarge, default_opener, resolve_opener
from .seeding import stable_hash
from .shardwriter import ShardWriter
from .stats import (
    BAD_IMAGE,
    BAD_LABEL,
    BAD_TEXT,
    EMPTY_CAPTION,
    FETCH_FAILED,
    IMAGE_TOO_LARGE,
    KEPT_REASONS,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_LABEL,
    TOO_LARGE,
    SkipCounter,
)

__all__ = ["IMAGE_SUFFIXES", "SOURCE_KINDS", "ImportOptions", "check_image", "csv_records", "folder_records",
           "load_record", "parquet_records", "resolve_opener", "run_import", "safe_key", "wds_records"]

logger = logging.getLogger("data_pipelines")

SOURCE_KINDS = ("folder", "csv", "parquet", "wds")
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats whose bytes are imported unchanged. MPO is what Pillow calls many camera and phone JPEGs (a
JPEG with extra pictures in APP2): a plain JPEG decoder reads the first picture, as training does."""
_CHUNK = 32
_EXAMPLES = 5


class _ImportSkips(SkipCounter):
    """The import's skip counter: also keeps the first few details per reason for stats.json, whoever
    counts them (the worker results, a source listing, the shard reader). `duplicate_image` (like the
    reader's `duplicate_key`) is counted on a sample that is still imported: not a skip."""

    kept = (*KEPT_REASONS, DUPLICATE_IMAGE)

    def __init__(self) -> None:
        super().__init__(where="import")
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        super().skip(reason, detail)
        kept = self.examples.setdefault(reason, [])
        if len(kept) < _EXAMPLES:
            kept.append(detail)

    def totals(self) -> tuple[int, int]:
        """(inputs skipped -- rows, files, samples; `bad_shard` counts input shards --, problems counted on
        samples that were imported anyway)."""
        counts = self.as_dict()
        kept = sum(n for reason, n in counts.items() if reason in self.kept)
        return sum(counts.values()) - kept, kept


# ------------------------------------------------------------------------------------------ loading
_worker_state: dict[str, Any] = {}


def _init_worker(opts: ImportOptions, opener: Callable[[str], bytes] | None) -> None:
    _worker_state["opts"] = opts
    _worker_state["opener"] = opener or resolve_opener(opts.opener)


def _read(value: Any, max_bytes: int = 0) -> Any:
    if isinstance(value, Lazy):
        return default_opener(value.path, max_bytes)
    return value


_ADDRESS = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")
"""The in-memory file Pillow names in its errors; removed from skip examples."""


def check_image(data: bytes, check: str, max_pixels: int) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of a usable image; raises `_Skip` with the reason otherwise.

    Width and height are those of the image as displayed (EXIF orientation 5-8: swapped), as training
    crops it; kept bytes carry their orientation to training, a re-encoded image is stored upright."""
    honour_pixel_limit(max_pixels)  # Pillow's own limit must not refuse what --max-image-pixels allows
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = exif_orientation(img)
            width, height = displayed_size(img.size, orientation)
            if max_pixels and width * height > max_pixels:
                raise _Skip(IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
            if check == "decode" or img.format not in _KEPT_FORMATS:
                img.load()
            if img.format in _KEPT_FORMATS:
                return _KEPT_FORMATS[img.format], data, width, height
            buf = io.BytesIO()  # GIF, BMP, TIFF...: re-encode losslessly once, training reads PNG
            plain = to_8bit(img)  # 16-bit / float grey: rescaled, not clipped to white or black
            if orientation in TRANSPOSES:  # the PNG carries no EXIF: store the pixels as displayed
                plain = plain.transpose(TRANSPOSES[orientation])
            plain.convert("RGBA" if "A" in plain.getbands() else "RGB").save(buf, format="PNG")
            return "png", buf.getvalue(), width, height
    except _Skip:
        raise
    except Image.DecompressionBombError as exc:
        raise _Skip(IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # PIL raises many types for bad data
        # Pillow names the BytesIO it read ("<_io.BytesIO object at 0x7f...>"): an address that made
        # stats.json differ from run to run for the same inputs
        raise _Skip(BAD_IMAGE, _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")) from None


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def load_record(record: Record, opts: ImportOptions, opener: Callable[[str], bytes]
                ) -> tuple[dict[str, Any] | None, str, str]:
    """(sample, "", "") or (None, reason, detail) for one record; (sample, reason, detail) when the sample
    is kept but lost an input the import counts (an extra image member, see `_drop_hidden_images`)."""
    key, image, caption, extra = record
    limit = opts.max_sample_bytes
    try:
        caption = _read(caption, limit)
        text: str | None = None
        if caption is None and opts.labels:
            extra = _with_label(extra, limit)  # classifier data: the .cls stands in for the caption
        elif caption is None:
            raise _Skip(MISSING_CAPTION)
        else:
            text = _caption_text(caption)
        source = image if isinstance(image, str) else None
        if isinstance(image, str):
            try:
                image = default_opener(image, limit) if opener is default_opener else opener(image)
            except SampleTooLarge as exc:
                raise _Skip(TOO_LARGE, str(exc)) from None
            except FileNotFoundError:
                raise _Skip(MISSING_IMAGE, f"{source} not found") from None
            except Exception as exc:  # network, permissions, the user's opener
                raise _Skip(FETCH_FAILED, f"{source}: {type(exc).__name__}: {exc}") from None
        if not image:
            raise _Skip(MISSING_IMAGE)
        if limit and len(image) > limit:  # bytes from Parquet or from a user's --opener
            raise _Skip(TOO_LARGE, f"{source or 'image'}: {len(image)} bytes > {limit}")
        ext, data, width, height = check_image(bytes(image), opts.check, opts.max_image_pixels)
        sample = {"__key__": key, ext: data, **({"txt": text.encode("utf-8")} if text is not None else {})}
        extra, dropped = _drop_hidden_images(extra, ext)
        for name, value in extra.items():
            sample[name] = bytes(_read(value, limit))
        if "json" not in sample:
            meta = {"width": width, "height": height, **({"source": source} if source else {})}
            sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        total = sum(len(v) for k, v in sample.items() if k != "__key__")
        if limit and total > limit:  # training would skip it: the members of a sample add up
            raise _Skip(TOO_LARGE, f"members of {total} bytes > {limit}")
    except SampleTooLarge as exc:  # a sidecar file
        return None, TOO_LARGE, f"{key}: {exc}"
    except _Skip as skip:
        return None, skip.reason, f"{key}: {skip.detail}" if skip.detail else key
    if dropped:
        return sample, DUPLICATE_IMAGE, (f"{key}: member(s) {', '.join(dropped)} left out: the image is "
                                         f"imported as .{ext}, which training must read first")
    return sample, "", ""


def _caption_text(caption: Any) -> str:
    """The stripped caption of a record; `_Skip` (bad_text, empty_caption) when training could not use it."""
    if isinstance(caption, (bytes, bytearray, memoryview)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Skip(BAD_TEXT, str(exc)) from None
    text = str(caption).strip()
    if not text:
        raise _Skip(EMPTY_CAPTION)
    return text


def _with_label(extra: dict[str, Any], limit: int) -> dict[str, Any]:
    """`extra` with its `.cls` read, for a `--labels` sample without a caption, which a classifier reads
    for its label alone; `_Skip` (missing_label, bad_label) when a classifier would skip it too."""
    raw = extra.get(LABEL_KEY)
    if raw is None:
        raise _Skip(MISSING_LABEL, f"no caption and no .{LABEL_KEY} label")
    raw = bytes(_read(raw, limit))
    if label_of({LABEL_KEY: raw}) < 0:  # training's own parser: a non-negative integer
        text = raw.decode("ascii", "replace").strip()
        raise _Skip(BAD_LABEL, f"no caption and .{LABEL_KEY} is not a class index: {text[:20]!r}")
    return {**extra, LABEL_KEY: raw}


def _drop_hidden_images(extra: dict[str, Any], ext: str) -> tuple[dict[str, Any], list[str]]:
    """Extra image members stay, under their own extension, unless training (which reads the first of
    jpg/jpeg/png/webp) would read one instead of the checked image written as `.ext`."""
    order = IMAGE_KEYS.index(ext)
    dropped = [n for n in extra if n in IMAGE_KEYS and IMAGE_KEYS.index(n) <= order]
    return {n: v for n, v in extra.items() if n not in dropped}, dropped


def _load_chunk(chunk: list[Record]) -> list[tuple[dict[str, Any] | None, str, str]]:
    opts, opener = _worker_state["opts"], _worker_state["opener"]
    return [load_record(r, opts, opener) for r in chunk]


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_results(chunks: Iterator[list[Record]], opts: ImportOptions,
                     opener: Callable[[str], bytes] | None) -> Iterator[list[tuple[Any, str, str]]]:
    """Load chunks in a process pool with bounded look-ahead, yielding results in input order."""
    if opts.workers <= 0:
        _init_worker(opts, opener)
        for chunk in chunks:
            yield _load_chunk(chunk)
        return
    # Not "fork": by now this process may run threads (pyarrow's pool reading Parquet, a caller's own), and
    # a child forked while one of them held a lock can hang for ever (seen: a pool worker that never exited).
    # The fork server is a fresh single-threaded process that imports this module once and forks workers.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(opts, opener)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_load_chunk, (chunk,)))
            if len(pending) >= 4 * opts.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ------------------------------------------------------------------------------------------ driver
def run_import(kind: str, src: str, out: str | os.PathLike, opts: ImportOptions | None = None,
               opener: Callable[[str], bytes] | None = None) -> dict[str, Any]:
    """Import `src` (a folder, CSV/TSV, Parquet file/folder or shard spec) into shards under `out`.

    `opener` (a picklable function URL/path -> bytes) overrides `opts.opener`. Returns the stats that are
    also written to OUT/stats.json.
    """
    opts = opts or ImportOptions()
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown import source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if opts.check not in ("header", "decode"):
        raise ValueError(f"check must be header or decode, got {opts.check!r}")
    if opts.labels and kind not in ("folder", "wds"):
        raise ValueError(f"--labels imports image + .cls samples: --from folder and --from wds only (a "
                         f"{kind} table has no .cls member)")
    if opener is None:
        resolve_opener(opts.opener)  # fail on a bad --opener before starting workers
    check_prefix(opts.prefix)
    out = Path(out)
    check_out(out, source_paths(kind, src), opts.prefix, opts.overwrite)
    skips = _ImportSkips()
    if kind == "folder":
        records = folder_records(src, skips, labels=opts.labels)
    elif kind == "csv":
        records = csv_records(src, opts, skips)
    elif kind == "parquet":
        records = parquet_records(src, opts)
    else:
        records = wds_records(src, skips, opts.max_sample_bytes)
    staging = Staging(out, opts.prefix, opts.overwrite)  # shards in OUT/.import-tmp until the import worked
    try:
        stats = _write_shards(kind, src, out, records, skips, staging.dir, opts, opener)
        staging.commit(stats["shards"], stats)
    except BaseException:
        staging.abandon()  # OUT as it was: never half an import that looks finished
        raise
    return stats


def _write_shards(kind: str, src: str, out: Path, records: Iterator[Record], skips: _ImportSkips,
                  folder: Path, opts: ImportOptions, opener: Callable[[str], bytes] | None) -> dict[str, Any]:
    """Load `records` and write the good samples as shards into `folder`; the import's stats."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    seen: set[int] = set()
    renamed = 0
    bar = tqdm(desc=f"import {kind}", unit=" samples", disable=not opts.progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        with ShardWriter(folder, opts.prefix, opts.samples_per_shard, opts.shard_bytes) as writer:
            for results in _ordered_results(_chunks(records, _CHUNK), opts, opener):
                for sample, reason, detail in results:
                    if reason:
                        skips.skip(reason, detail)
                    if sample is None:
                        continue
                    key = sample["__key__"]
                    digest, n = stable_hash(key), 0
                    while digest in seen:  # keys must be unique: audit, per-sample randomness, grouping
                        n += 1
                        sample["__key__"] = f"{key}_dup{n}"
                        digest = stable_hash(sample["__key__"])
                    renamed += n > 0
                    seen.add(digest)
                    writer.write(sample)
                bar.update(len(results))
    finally:
        bar.close()
    shards = writer.shards
    if not shards:
        examples = "; ".join(f"{reason}: {found[0]}" for reason, found in sorted(skips.examples.items()))
        hint = ("; classifier data (image + .cls, no caption) needs --labels"
                if MISSING_CAPTION in skips.as_dict() and not opts.labels else "")
        raise ValueError(f"import of {src} produced no samples (skipped: {skips.as_dict()}"
                         f"{'; e.g. ' + examples if examples else ''}){hint}; {out} was left as it was")
    skipped_total, counted_kept_total = skips.totals()
    stats = {
        "source": str(src), "from": kind, "out": str(out), "options": asdict(opts),
        "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
        "shards": shards, "skipped": skips.as_dict(),
        "skipped_total": skipped_total, "counted_kept_total": counted_kept_total,  # bad_shard: input shards
        "skipped_examples": dict(sorted(skips.examples.items())), "renamed_duplicate_keys": renamed,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    last = len(shards) - 1
    stats["urls"] = (str(out / f"{opts.prefix}-{{000000..{last:06d}}}.tar") if last
                     else str(out / shards[0]["name"]))
    return stats
