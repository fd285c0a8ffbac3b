"""Importers: image-caption data from a folder, CSV/TSV, Parquet or existing WebDataset shards -> shards.

Every source is turned into a stream of small *records* (key, image reference or bytes, caption, extra
members) in a deterministic order; a pool of worker processes loads and checks each record (reads or
fetches the image through `openers`, checks the byte limit, the header, the pixel limit and the caption
exactly as training will) and the main process writes the results in input order, so the output shards
do not depend on the worker count.
At most a few chunks per worker are in flight, so a Parquet file of image bytes is never all in memory.

Written per import: `OUT/{prefix}-NNNNNN.tar` (plain tar, KEY.jpg|png|webp + KEY.txt + KEY.json with the
source reference), `sizes.json` (samples per shard, read by the loader's start-up checks) and `stats.json`
(samples and bytes per shard, skipped samples by reason with examples). Image bytes are copied unchanged;
formats other than JPEG/PNG/WebP are re-encoded once as PNG so training can read them.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .decode import IMAGE_KEYS, image_bytes
from .openers import SampleTooLarge, default_opener, resolve_opener
from .seeding import stable_hash
from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .shardstream import shard_samples
from .shardwriter import ShardWriter
from .stats import (
    BAD_IMAGE,
    BAD_TEXT,
    EMPTY_CAPTION,
    FETCH_FAILED,
    IMAGE_TOO_LARGE,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TOO_LARGE,
    TOO_LARGE_KEY,
    SkipCounter,
)
from .urls import expand_urls

logger = logging.getLogger("data_pipelines")

SOURCE_KINDS = ("folder", "csv", "parquet", "wds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_COLUMNS = ("image", "jpg", "img", "image_bytes", "bytes", "filepath", "file", "path", "image_path",
                  "url", "image_url")
_CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt", "description")
_CHUNK = 32
_EXAMPLES = 5


@dataclass
class ImportOptions:
    """How an import writes and checks; the defaults suit web-scale data."""

    samples_per_shard: int = 10000
    shard_bytes: int = 0
    """Start a new shard before one would exceed this many bytes (0: by samples only)."""
    workers: int = 4
    """Loader processes (0: load in the main process)."""
    prefix: str = "shard"
    check: str = "header"
    """`header`: open each image (format, size, pixel limit); `decode`: also decode it fully (catches
    truncated files, ~10x slower)."""
    max_image_pixels: int = 89478485
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
    """Skip (as `too_large`) images and samples over this many bytes, as training's data.max_sample_bytes
    would; local files and http(s) bodies over it are never read whole (0: no limit)."""
    image_col: str = ""
    caption_col: str = ""
    key_col: str = ""
    delimiter: str = ""
    """CSV field separator; empty: tab for .tsv files, else comma."""
    opener: str = ""
    """`module:function` that maps an image URL or path to bytes (e.g. an S3 client); empty: local files
    and http(s) via urllib."""
    progress: bool = True


@dataclass
class _Lazy:
    """A file the worker reads (sidecar captions, .json/.cls members), so the main process only lists."""

    path: str


Record = tuple[str, Any, Any, dict[str, Any]]
"""(key, image: URL/path str | bytes | None, caption: str | bytes | _Lazy | None, extra members)."""


# ------------------------------------------------------------------------------------------ sources
_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


def safe_key(raw: str) -> str:
    """A WebDataset-safe key: no dots in names (webdataset splits the extension at the first dot), no
    spaces or odd characters, no leading slash or empty path parts."""
    parts = [_UNSAFE.sub("_", p) for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _pick(columns: list[str], wanted: str, defaults: tuple[str, ...], what: str, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{source}: no {what} column {wanted!r}; columns are {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for name in defaults:
        if name in lower:
            return lower[name]
    raise ValueError(f"{source}: cannot tell which column holds the {what}; columns are "
                     f"{', '.join(columns)} (pass --{what}-col)")


def _resolve_ref(ref: str, base: Path) -> str:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", ref) or os.path.isabs(ref):
        return ref
    return str(base / ref)


def folder_records(src: str, skips: SkipCounter) -> Iterator[Record]:
    """Images under `src` (recursively, sorted) with a sidecar caption `NAME.txt`; `NAME.json` / `.cls`
    sidecars are kept as members. Captions without an image are counted as missing_image."""
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"--from folder: {src} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for stem in sorted({p.with_suffix("") for p in files if p.suffix == ".txt"} - set(images)):
        skips.skip(MISSING_IMAGE, f"{stem}.txt has no image")
    for stem, image in sorted(images.items()):
        # "my.photo" + ".txt" (Path.with_suffix would replace ".photo")
        sidecar = {ext: stem.parent / f"{stem.name}.{ext}" for ext in ("txt", "json", "cls")}
        caption = sidecar["txt"]
        extra = {ext: _Lazy(str(sidecar[ext])) for ext in ("json", "cls") if sidecar[ext].is_file()}
        key = safe_key(str(stem.relative_to(root)))
        yield key, str(image), _Lazy(str(caption)) if caption.is_file() else None, extra


def csv_records(src: str, opts: ImportOptions) -> Iterator[Record]:
    """Rows of a CSV/TSV file with a header: image path (relative to the file) or URL, and a caption."""
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"--from csv: {src} is not a file")
    delimiter = opts.delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        image_col = _pick(columns, opts.image_col, _IMAGE_COLUMNS, "image", src)
        caption_col = _pick(columns, opts.caption_col, _CAPTION_COLUMNS, "caption", src)
        if opts.key_col and opts.key_col not in columns:
            raise ValueError(f"{src}: no key column {opts.key_col!r}; columns are {', '.join(columns)}")
        for index, row in enumerate(reader):
            key = safe_key(row[opts.key_col]) if opts.key_col else f"{index:09d}"
            ref = (row.get(image_col) or "").strip()
            yield key, _resolve_ref(ref, path.parent) if ref else None, row.get(caption_col), {}


def parquet_records(src: str, opts: ImportOptions) -> Iterator[Record]:
    """Rows of a Parquet file (or a folder of them, sorted): image bytes, a {bytes, path} struct (Hugging
    Face `Image`) or a path/URL, and a caption. Read in record batches, never whole."""
    import pyarrow.parquet as pq

    root = Path(src)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise ValueError(f"--from parquet: no parquet file at {src}")
    index = 0
    for file in files:
        pf = pq.ParquetFile(file)
        columns = list(pf.schema_arrow.names)
        image_col = _pick(columns, opts.image_col, _IMAGE_COLUMNS, "image", str(file))
        caption_col = _pick(columns, opts.caption_col, _CAPTION_COLUMNS, "caption", str(file))
        wanted = [image_col, caption_col] + ([opts.key_col] if opts.key_col else [])
        if opts.key_col and opts.key_col not in columns:
            raise ValueError(f"{file}: no key column {opts.key_col!r}; columns are {', '.join(columns)}")
        for batch in pf.iter_batches(batch_size=256, columns=wanted):
            rows = batch.to_pydict()
            for i in range(batch.num_rows):
                image = rows[image_col][i]
                if isinstance(image, dict):  # Hugging Face datasets' Image feature
                    image = image.get("bytes") or image.get("path")
                if isinstance(image, str):
                    image = _resolve_ref(image, file.parent)
                key = safe_key(str(rows[opts.key_col][i])) if opts.key_col else f"{index:09d}"
                yield key, image, rows[caption_col][i], {}
                index += 1


def wds_records(src: str, skips: SkipCounter, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[Record]:
    """Samples of existing WebDataset shards (brace spec, `::`, pipe:, http), every member kept, keys
    made safe like the other sources' (`safe_key`: no `..`, leading `/` or odd characters in member
    names). Samples over `max_bytes` are counted as too_large without reading their big members."""
    for sample in shard_samples(expand_urls(src), skips, max_bytes=max_bytes):
        if TOO_LARGE_KEY in sample:
            skips.skip(TOO_LARGE, f"{sample['__key__']}: {sample[TOO_LARGE_KEY]}")
            continue
        image = image_bytes(sample)
        extra = {k: v for k, v in sample.items()
                 if not k.startswith("__") and k not in IMAGE_KEYS and k != "txt"}
        yield safe_key(sample["__key__"]), image, sample.get("txt"), extra


# ------------------------------------------------------------------------------------------ loading
_worker_state: dict[str, Any] = {}


def _init_worker(opts: ImportOptions, opener: Callable[[str], bytes] | None) -> None:
    _worker_state["opts"] = opts
    _worker_state["opener"] = opener or resolve_opener(opts.opener)


def _read(value: Any, max_bytes: int = 0) -> Any:
    if isinstance(value, _Lazy):
        return default_opener(value.path, max_bytes)
    return value


def check_image(data: bytes, check: str, max_pixels: int) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of a usable image; raises `_Skip` with the reason otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels and width * height > max_pixels:
                raise _Skip(IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
            if check == "decode" or img.format not in _KEPT_FORMATS:
                img.load()
            if img.format in _KEPT_FORMATS:
                return _KEPT_FORMATS[img.format], data, width, height
            buf = io.BytesIO()  # GIF, BMP, TIFF...: re-encode losslessly once, training reads PNG
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
            return "png", buf.getvalue(), width, height
    except _Skip:
        raise
    except Image.DecompressionBombError as exc:
        raise _Skip(IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # PIL raises many types for bad data
        raise _Skip(BAD_IMAGE, f"{type(exc).__name__}: {exc}") from None


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def load_record(record: Record, opts: ImportOptions, opener: Callable[[str], bytes]
                ) -> tuple[dict[str, Any] | None, str, str]:
    """(sample, "", "") or (None, reason, detail) for one record."""
    key, image, caption, extra = record
    limit = opts.max_sample_bytes
    try:
        caption = _read(caption, limit)
        if caption is None:
            raise _Skip(MISSING_CAPTION)
        if isinstance(caption, (bytes, bytearray, memoryview)):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Skip(BAD_TEXT, str(exc)) from None
        text = str(caption).strip()
        if not text:
            raise _Skip(EMPTY_CAPTION)
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
        sample = {"__key__": key, ext: data, "txt": text.encode("utf-8")}
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
    return sample, "", ""


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
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
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
    if opener is None:
        resolve_opener(opts.opener)  # fail on a bad --opener before starting workers
    skips = SkipCounter(where="import")
    examples: dict[str, list[str]] = {}
    if kind == "folder":
        records = folder_records(src, skips)
    elif kind == "csv":
        records = csv_records(src, opts)
    elif kind == "parquet":
        records = parquet_records(src, opts)
    else:
        records = wds_records(src, skips, opts.max_sample_bytes)
    from tqdm import tqdm

    t0 = time.perf_counter()
    seen: set[int] = set()
    renamed = 0
    bar = tqdm(desc=f"import {kind}", unit=" samples", disable=not opts.progress, file=sys.stderr,
               dynamic_ncols=True)
    with ShardWriter(out, opts.prefix, opts.samples_per_shard, opts.shard_bytes) as writer:
        for results in _ordered_results(_chunks(records, _CHUNK), opts, opener):
            for sample, reason, detail in results:
                if sample is None:
                    skips.skip(reason, detail)
                    examples.setdefault(reason, [])
                    if len(examples[reason]) < _EXAMPLES:
                        examples[reason].append(detail)
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
    bar.close()
    shards = writer.shards
    stats = {
        "source": str(src), "from": kind, "out": str(out), "options": asdict(opts),
        "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
        "shards": shards, "skipped": skips.as_dict(), "skipped_total": skips.total,  # bad_shard: input shards
        "skipped_examples": examples, "renamed_duplicate_keys": renamed,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    if shards:
        last = len(shards) - 1
        stats["urls"] = (str(Path(out) / f"{opts.prefix}-{{000000..{last:06d}}}.tar") if last
                         else str(Path(out) / shards[0]["name"]))
    Path(out, "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    if not shards:
        raise ValueError(f"import of {src} produced no samples (skipped: {skips.as_dict()}); see "
                         f"{Path(out, 'stats.json')}")
    return stats
