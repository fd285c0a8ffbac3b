"""Openers for the importers: the bytes of an image path or URL, never more than a byte limit.

`default_opener` reads local files and http(s) URLs in chunks and stops (raising `SampleTooLarge`) as soon as
a body is over the limit, so one huge file or URL cannot exhaust an import worker's memory; `resolve_opener`
turns `--opener module:function` into the user's own fetcher.
"""

from __future__ import annotations

import importlib
import os
import urllib.request
from collections.abc import Callable
from typing import Any

from .urls import local_path


class SampleTooLarge(Exception):
    """An image (or sidecar) over `max_sample_bytes`; an --opener may raise it too (counted as too_large)."""


_READ_CHUNK = 1 << 20


def _read_limited(fh: Any, ref: str, max_bytes: int) -> bytes:
    """All of `fh`, read in chunks; `SampleTooLarge` as soon as more than `max_bytes` (0: no limit) came."""
    if not max_bytes:
        return fh.read()
    chunks, size = [], 0
    while chunk := fh.read(_READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise SampleTooLarge(f"{ref}: more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def default_opener(ref: str, max_bytes: int = 0) -> bytes:
    """Bytes of a local path, a `file:` URL (read as `urls.local_path` names it, as training's shard
    reader does) or an http(s) URL; over `max_bytes` (0: no limit) raises `SampleTooLarge`
    without reading the rest (a declared Content-Length or file size over it: without reading at all)."""
    if ref.startswith(("http://", "https://")):
        with urllib.request.urlopen(ref, timeout=60) as response:  # noqa: S310 - the user's own URLs
            declared = response.headers.get("Content-Length", "")
            if max_bytes and declared.isdigit() and int(declared) > max_bytes:
                raise SampleTooLarge(f"{ref}: Content-Length {declared} > {max_bytes} bytes")
            return _read_limited(response, ref, max_bytes)
    with open(local_path(ref), "rb") as fh:  # a `file:` URL (a table's `file:///d/a%20b.jpg`): its file
        size = os.fstat(fh.fileno()).st_size
        if max_bytes and size > max_bytes:
            raise SampleTooLarge(f"{ref}: {size} bytes > {max_bytes}")
        return _read_limited(fh, ref, max_bytes)


def resolve_opener(spec: str) -> Callable[[str], bytes]:
    """`module:function` -> the function (for --opener); empty -> `default_opener`."""
    if not spec:
        return default_opener
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--opener must be module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--opener {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"--opener {spec!r} is not callable")
    return fn
