"""Raw samples from WebDataset tar shards, with every shard failure counted instead of raised.

Built from webdataset's own stages (`url_opener` -> tar members -> `group_by_keys`) so local paths,
`pipe:` commands and http(s) URLs all work. Three additions make failures visible and bounded:

* one handler, shared by all stages, turns exceptions into a single `bad_shard` count per shard (a
  truncated member otherwise raises twice) and keeps going with the next shard;
* a truncated tar whose cut falls on a header boundary ends *silently* in Python's streaming tar reader,
  so each shard's byte stream is watched and, when the tar reader stops, the rest is drained and checked
  for the end-of-archive marker (two zero blocks) that every complete tar ends with;
* members are read by `_tar_members` (webdataset's `tar_file_iterator` plus a byte limit): once a
  sample's members add up to more than `max_bytes`, the rest of it is not read -- the streaming tar
  reader skips over it in small blocks, so a 100 GB member costs no memory -- and the sample carries
  `TOO_LARGE_KEY` instead, which the consumers count as `too_large`. The sample itself is still yielded,
  so sample positions inside a shard (and resume) do not depend on the limit. Tar metadata headers (pax,
  GNU long names) bigger than the limit make the shard a `bad_shard`.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import webdataset as wds
from webdataset import tariterators

from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .stats import BAD_SHARD, DUPLICATE_MEMBER, TOO_LARGE_KEY, SkipCounter

_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_DRAIN_LIMIT = 1 << 20
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


_SKIP_META = re.compile(r"__[^/]*__($|/)")
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class MetadataTooLarge(ValueError):
    """A pax or GNU long-name header larger than the byte limit (tarfile would read it whole)."""


def _limited_tarinfo(max_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses metadata headers over `max_bytes` before tarfile reads them whole."""

    class LimitedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's own hook
            if max_bytes and self.size > max_bytes and self.type in _META_TYPES:
                raise MetadataTooLarge(f"tar header {self.name!r} of {self.size} bytes > max_sample_bytes="
                                       f"{max_bytes}")
            return super()._proc_member(tarfile_)

    return LimitedTarInfo


def _tar_members(fileobj: Any, max_bytes: int, handler: Callable[[Exception], bool],
                 select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_iterator` with a per-sample byte limit (see the module docstring).

    Sizes are summed over consecutive members of one key (how `group_by_keys` groups them), selected or
    not, so every reader of a shard (training, tokenizer, inspect) skips the same samples.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_limited_tarinfo(max_bytes)) as stream:
        yield from _members_of(stream, fileobj, max_bytes, handler, select_files)


def _members_of(stream: tarfile.TarFile, fileobj: Any, max_bytes: int, handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    current, total, flagged = None, 0, False
    for tarinfo in stream:
        stream.members = []  # the streaming reader would otherwise keep every header of the shard
        fname = tarinfo.name
        try:
            if not tarinfo.isreg() or fname is None:
                continue
            if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                continue
            if _SKIP_META.match(fname):
                continue
            prefix, _ = tariterators.base_plus_ext(fname)
            if prefix is None:
                continue  # group_by_keys drops names without an extension
            if prefix != current:
                current, total, flagged = prefix, 0, False
            total += tarinfo.size
            if max_bytes and total > max_bytes:
                if not flagged:
                    flagged = True
                    # group_by_keys files `KEY.__too_large__` under TOO_LARGE_KEY in the sample
                    yield {"fname": f"{prefix}.{TOO_LARGE_KEY}",
                           "data": f"{fname}: {tarinfo.size} bytes ({total} in the sample so far) > "
                                   f"max_sample_bytes={max_bytes}"}
                continue  # never read: the next header read skips over it in small blocks
            if select_files is not None and not select_files(fname):
                continue
            yield {"fname": fname, "data": stream.extractfile(tarinfo).read()}
        except Exception as exn:
            if exn.args:
                exn.args = (f"{exn.args[0]} @ {fileobj}",) + exn.args[1:]
            if handler(exn):
                continue
            break


def _expand(sources: Iterable[dict], max_bytes: int, handler: Callable[[Exception], bool],
            select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` over `_tar_members`: files tagged with `__url__`, `{}` after
    each shard."""
    for source in sources:
        url = source["url"]
        try:
            for member in _tar_members(source["stream"], max_bytes, handler, select_files):
                member["__url__"] = url
                yield member
            yield {}
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), url)
            if handler(exn):
                continue
            break


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
        """Between url_opener and the tar reader: wrap each opened stream so its end can be checked."""
        for source in sources:
            if self.current is not None:
                self.current.close()  # the previous shard failed mid-way; do not leak its handle
            self.current = _WatchedStream(source["stream"], source["url"])
            source["stream"] = self.current
            yield source
        if self.current is not None:
            self.current.close()

    def check_ends(self, files: Iterable[dict]) -> Iterator[dict]:
        """After the tar reader (`_expand`): at each clean end-of-shard marker ({}), check the tar is
        complete."""
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
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[dict[str, Any]]:
    """Samples (`__key__`, `__url__`, extension -> bytes) of `urls` in order; failures go to `skips`.

    `select_files` filters tar members by name before their bytes are read (the tokenizer reads captions
    only). A sample whose members add up to more than `max_bytes` (`data.max_sample_bytes`; 0: no limit)
    is yielded with only the members read before the limit and `TOO_LARGE_KEY` set to why; consumers
    count it as `too_large` (`decode.split_sample` does).
    """
    if not urls:
        return iter(())
    errors = _ShardErrors(urls, skips)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        partial(tariterators.url_opener, handler=errors),
        errors.watch,
        partial(_expand, max_bytes=max_bytes, handler=errors, select_files=select_files),
        errors.check_ends,
        partial(tariterators.group_by_keys, handler=errors),
    )
    return iter(pipeline)
