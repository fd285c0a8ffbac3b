"""Sources of `pretrain data import` other than CSV: an image folder, Parquet, existing WebDataset shards.

Each source lists its input as *records* (key, image reference or bytes, caption, extra members) in a
deterministic order, without loading images (the import's worker processes do that). Inputs a source
drops itself -- a caption without an image, a second image with the same name -- are counted on the
import's `SkipCounter`, so nothing leaves without a trace in stats.json.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import IMAGE_KEYS
from .import_options import ImportOptions
from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .shardstream import shard_samples
from .stats import MISSING_IMAGE, TOO_LARGE, TOO_LARGE_KEY, SkipCounter
from .urls import expand_urls, is_local, local_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "img", "image_bytes", "bytes", "filepath", "file", "path", "image_path",
                 "url", "image_url")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt", "description")
DUPLICATE_IMAGE = "duplicate_image"
"""Import only: an input image that could not go into the output -- a folder's `IMG.png` beside `IMG.jpg`
(one caption, one sample: the first in name order is imported), or a shard sample's extra image member
that would hide the imported image from training. Counted; the sample itself is kept."""


@dataclass
class Lazy:
    """A file the worker reads (sidecar captions, .json/.cls members), so the main process only lists."""

    path: str


Record = tuple[str, Any, Any, dict[str, Any]]
"""(key, image: URL/path str | bytes | None, caption: str | bytes | Lazy | None, extra members)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def safe_key(raw: str) -> str:
    """A WebDataset-safe key: no dots in names (webdataset splits the extension at the first dot), no
    spaces or odd characters, no leading slash or empty path parts."""
    parts = [_UNSAFE.sub("_", p) for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def pick_column(columns: list[str], wanted: str, defaults: tuple[str, ...], what: str, source: str) -> str:
    """The column `--{what}-col` names, else the first of `defaults` present (case-insensitive)."""
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


def is_url(ref: str) -> bool:
    """True for `scheme://...` references (http, s3, ...), which are fetched rather than read locally."""
    return bool(_URL.match(ref))


def resolve_ref(ref: str, base: Path) -> str:
    """An image reference from a table: URLs and absolute paths as given, others relative to the table."""
    if is_url(ref) or os.path.isabs(ref):
        return ref
    return str(base / ref)


def source_paths(kind: str, src: str) -> list[str]:
    """The local files and folders an import of `src` reads (for the checks on OUT): the folder, table
    file or folder, or every local shard of a `--from wds` spec (`pipe:` and remote URLs left out)."""
    if kind != "wds":
        return [src]
    return [local_path(u) for u in expand_urls(src) if is_local(u)]


def folder_records(src: str, skips: SkipCounter, labels: bool = False) -> Iterator[Record]:
    """Images under `src` (recursively, sorted) with a sidecar caption `NAME.txt`; `NAME.json` / `.cls`
    sidecars are kept as members. Captions without an image are counted as missing_image -- with `labels`
    (classifier data, where `NAME.cls` may stand in for the caption) `.cls` files without one too; a
    second image with the same name (`IMG.png` beside `IMG.jpg`: one caption, one sample) as
    duplicate_image."""
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"--from folder: {src} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images: dict[Path, Path] = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = path.with_suffix("")
        if stem in images:
            skips.skip(DUPLICATE_IMAGE, f"{path}: same name as {images[stem].name}, which was imported "
                                        f"with {stem.name}.txt")
            continue
        images[stem] = path
    sidecars = (".txt", ".cls") if labels else (".txt",)
    orphans: dict[Path, str] = {}
    for suffix in sidecars:  # one count per name, under its caption when it has one
        for path in files:
            if path.suffix.lower() == suffix and path.with_suffix("") not in images:
                orphans.setdefault(path.with_suffix(""), suffix)
    for stem, suffix in sorted(orphans.items()):
        skips.skip(MISSING_IMAGE, f"{stem}{suffix} has no image")
    # sidecars by (stem, lower-case suffix), as images are matched: A.jpg's caption may be A.TXT
    beside = {(p.with_suffix(""), p.suffix.lower()): p for p in files}
    for stem, image in sorted(images.items()):
        # "my.photo" + ".txt" (Path.with_suffix would replace ".photo")
        sidecar = {ext: beside.get((stem, f".{ext}"), stem.parent / f"{stem.name}.{ext}")
                   for ext in ("txt", "json", "cls")}
        caption = sidecar["txt"]
        extra = {ext: Lazy(str(sidecar[ext])) for ext in ("json", "cls") if sidecar[ext].is_file()}
        key = safe_key(str(stem.relative_to(root)))
        yield key, str(image), Lazy(str(caption)) if caption.is_file() else None, extra


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
        image_col = pick_column(columns, opts.image_col, IMAGE_COLUMNS, "image", str(file))
        caption_col = pick_column(columns, opts.caption_col, CAPTION_COLUMNS, "caption", str(file))
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
                    image = resolve_ref(image, file.parent)
                key = safe_key(str(rows[opts.key_col][i])) if opts.key_col else f"{index:09d}"
                yield key, image, rows[caption_col][i], {}
                index += 1


def wds_records(src: str, skips: SkipCounter, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[Record]:
    """Samples of existing WebDataset shards (brace spec, `::`, pipe:, http), every member kept -- a second
    image member too, under its own extension -- with keys made safe like the other sources' (`safe_key`:
    no `..`, leading `/` or odd characters in member names). The image checked and imported is the one
    training reads (the first of jpg/jpeg/png/webp). Samples over `max_bytes` are counted as too_large
    without reading their big members."""
    for sample in shard_samples(expand_urls(src), skips, max_bytes=max_bytes):
        if TOO_LARGE_KEY in sample:
            skips.skip(TOO_LARGE, f"{sample['__key__']}: {sample[TOO_LARGE_KEY]}")
            continue
        chosen = next((k for k in IMAGE_KEYS if sample.get(k) is not None), None)
        extra = {k: v for k, v in sample.items() if not k.startswith("__") and k not in ("txt", chosen)}
        yield safe_key(sample["__key__"]), sample[chosen] if chosen else None, sample.get("txt"), extra
