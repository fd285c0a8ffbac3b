"""Raw samples from WebDataset tar shards, with every shard failure counted instead of raised.

Built from webdataset's own stages (`url_opener` -> `tar_file_expander` -> `group_by_keys`) so local
paths, `pipe:` commands and http(s) URLs all work. Two additions make failures visible:

* one handler, shared by all stages, turns exceptions into a single `bad_shard` count per shard (a
  truncated member otherwise raises twice) and keeps going with the next shard;
* a truncated tar whose cut falls on a header boundary ends *silently* in Python's streaming tar reader,
  so each shard's byte stream is watched and, when the tar reader stops, the rest is drained and checked
  for the end-of-archive marker (two zero blocks) that every complete tar ends with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import webdataset as wds
from webdataset import tariterators

from .stats import BAD_SHARD, DUPLICATE_MEMBER, SkipCounter

_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_DRAIN_LIMIT = 1 << 20
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class _WatchedStream:
    """Read-through proxy that remembers size, first bytes and the last 1 KiB of a shard's byte stream."""

    def __init__(self, raw: Any, url: str) -> None:
        self.raw = raw
        self.url = url
        self.total = 0
        self.head = b""
        self.tail = b""
        self.closed_by_us = False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self._note(data)
        return data

    def _note(self, data: bytes) -> None:
        if not data:
            return
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.total += len(data)
        self.tail = (self.tail + data[-_END_MARKER:])[-_END_MARKER:]

    def finish(self) -> str | None:
        """Drain what the tar reader left and return why the shard looks incomplete (None when fine)."""
        try:
            drained = 0
            while drained < _DRAIN_LIMIT:
                chunk = self.raw.read(64 * 1024)
                if not chunk:
                    break
                self._note(chunk)
                drained += len(chunk)
            else:
                return None  # long trailing data after the archive: not a truncation
        except Exception as exc:  # e.g. a pipe: command that exited with an error status
            return f"error reading the end of the stream: {exc!r}"
        finally:
            self.close()
        if self.head.startswith(_COMPRESSED_MAGIC):
            return None  # the decompressor reports truncation itself
        if self.total % _BLOCK:
            return f"size {self.total} is not a multiple of {_BLOCK} bytes (truncated tar)"
        if len(self.tail) < _END_MARKER or any(self.tail):
            return "no end-of-archive marker (truncated tar)"
        return None

    def close(self) -> None:
        if not self.closed_by_us:
            self.closed_by_us = True
            # closing a failed pipe re-raises its exit status, which was already counted
            with contextlib.suppress(Exception):
                self.raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __str__(self) -> str:
        return f"<shard {self.url}>"


class _ShardErrors:
    """Exception handler for the webdataset stages: count each failing shard once, always continue."""

    def __init__(self, urls: Iterable[str], skips: SkipCounter) -> None:
        self.urls = set(urls)
        self.skips = skips
        self.current: _WatchedStream | None = None
        self.counted: set[str] = set()

    def bad(self, url: str, why: str) -> None:
        if url in self.counted:
            return
        self.counted.add(url)
        self.skips.skip(BAD_SHARD, f"{url}: {why}")

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
            self.skips.skip(DUPLICATE_MEMBER, str(exn.args[0])[:300] if exn.args else "")
            return True
        url = next((a for a in exn.args if isinstance(a, str) and a in self.urls), None)
        if url is None:
            url = self.current.url if self.current is not None else "?"
        first = exn.args[0] if exn.args else ""
        self.bad(url, f"{type(exn).__name__}: {first}")
        return True

    # pipeline stages -------------------------------------------------------------------------------
    def watch(self, sources: Iterable[dict]) -> Iterator[dict]:
        """Between url_opener and tar_file_expander: wrap each opened stream so its end can be checked."""
        for source in sources:
            if self.current is not None:
                self.current.close()  # the previous shard failed mid-way; do not leak its handle
            self.current = _WatchedStream(source["stream"], source["url"])
            source["stream"] = self.current
            yield source
        if self.current is not None:
            self.current.close()

    def check_ends(self, files: Iterable[dict]) -> Iterator[dict]:
        """After tar_file_expander: at each clean end-of-shard marker ({}), verify the tar was complete."""
        for item in files:
            if not item and self.current is not None:
                why = self.current.finish()
                if why:
                    self.bad(self.current.url, why)
            yield item


def shard_samples(
    urls: list[str],
    skips: SkipCounter,
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples (`__key__`, `__url__`, extension -> bytes) of `urls` in order; failures go to `skips`.

    `select_files` filters tar members by name before their bytes are read (the tokenizer reads captions
    only).
    """
    if not urls:
        return iter(())
    errors = _ShardErrors(urls, skips)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        partial(tariterators.url_opener, handler=errors),
        errors.watch,
        partial(tariterators.tar_file_expander, handler=errors, select_files=select_files),
        errors.check_ends,
        partial(tariterators.group_by_keys, handler=errors),
    )
    return iter(pipeline)
