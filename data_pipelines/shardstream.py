"""Raw samples from WebDataset tar shards, with every shard failure counted instead of raised.

Built from webdataset's own stages (`url_opener` -> tar members -> grouping by key) so local paths,
`pipe:` commands and http(s) URLs all work. These additions make failures visible and bounded:

* one handler, shared by all stages, turns exceptions into a single `bad_shard` count per shard (a
  truncated member otherwise raises twice) and keeps going with the next shard;
* a truncated tar whose cut falls on a header boundary ends *silently* in Python's streaming tar reader
  (and so does a corrupt header, or a second tar appended with `cat`), so each shard's byte stream is
  watched and, when the tar reader stops, the rest is drained and checked: a complete tar ends with the
  end-of-archive marker (two zero blocks) and only zeros after it;
* a shard that ends badly drops its last sample when it lacks a member the sample before it had (its
  other members were cut off): that loss is part of the `bad_shard`, not a `missing_caption`;
* a member whose extension the current sample already has (`a.jpg a.txt a.jpg a.txt`, e.g. two exports
  concatenated) starts a new sample under the same key, counted as `duplicate_key` (webdataset's
  `group_by_keys` would drop the second sample's members);
* members are read by `_tar_members` (webdataset's `tar_file_iterator` plus a byte limit): once a
  sample's members add up to more than `max_bytes`, the rest of it is not read -- the streaming tar
  reader skips over it in small blocks, so a 100 GB member costs no memory -- and the sample carries
  `TOO_LARGE_KEY` instead, which the consumers count as `too_large`. The sample itself is still yielded,
  so sample positions inside a shard (and resume) do not depend on the limit. Tar metadata headers (pax,
  GNU long names) bigger than the limit make the shard a `bad_shard`;
* http(s) shards are read by curl with a stall limit (`HTTP_STALL_S`): webdataset's own curl command has
  none, so a server that accepted the connection and then sent nothing blocked the worker for ever
  instead of becoming a `bad_shard`.
"""

from __future__ import annotations

import collections
import contextlib
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import webdataset as wds
from webdataset import tariterators
from webdataset.gopen import Pipe, gopen_curl, rewrite_url

from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .stats import BAD_SHARD, DUPLICATE_KEY, TOO_LARGE_KEY, SkipCounter

_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_DRAIN_LIMIT = 1 << 20
_RECENT = 64 * 1024  # bytes of a shard kept to check what the tar reader buffered past the archive's end
_END = "__end_of_shard__"
"""Key of the item `_expand` yields after each shard: "" for a clean end, else why the shard ended badly."""
_SAMPLE, _REPEAT = "__sample__", "__repeat__"
"""Tags `_members_of` puts on each member: the sample's number in the shard, and whether it repeats the
key of the sample before it."""
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

    Sizes are summed over the members of one sample (consecutive members of one key, until an
    extension repeats), selected or not, so every reader of a shard (training, tokenizer, inspect) skips
    the same samples. Samples are delimited here, once, and `_group` follows the `_SAMPLE` tags.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_limited_tarinfo(max_bytes)) as stream:
        yield from _members_of(stream, fileobj, max_bytes, handler, select_files)
        if isinstance(fileobj, _WatchedStream):
            fileobj.archive_end = stream.offset  # where the tar reader stopped: its end-of-archive marker


def _members_of(stream: tarfile.TarFile, fileobj: Any, max_bytes: int, handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    current, total, flagged, number, repeat = None, 0, False, -1, False
    extensions: set[str] = set()
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
            prefix, suffix = tariterators.base_plus_ext(fname)
            if prefix is None:
                continue  # names without an extension belong to no sample (as in webdataset)
            suffix = suffix.lower()
            if prefix != current or suffix in extensions:
                repeat = prefix == current
                current, total, flagged, number, extensions = prefix, 0, False, number + 1, set()
            extensions.add(suffix)
            total += tarinfo.size
            if max_bytes and total > max_bytes:
                if not flagged:
                    flagged = True
                    # `_group` files `KEY.__too_large__` under TOO_LARGE_KEY in the sample
                    yield {"fname": f"{prefix}.{TOO_LARGE_KEY}",
                           "data": f"{fname}: {tarinfo.size} bytes ({total} in the sample so far) > "
                                   f"max_sample_bytes={max_bytes}", _SAMPLE: number, _REPEAT: repeat}
                continue  # never read: the next header read skips over it in small blocks
            if select_files is not None and not select_files(fname):
                continue
            data = stream.extractfile(tarinfo).read()
            yield {"fname": fname, "data": data, _SAMPLE: number, _REPEAT: repeat}
        except Exception as exn:
            if exn.args:
                exn.args = (f"{exn.args[0]} @ {fileobj}",) + exn.args[1:]
            if handler(exn):
                continue
            break


def _expand(sources: Iterable[dict], max_bytes: int, handler: Callable[[Exception], bool],
            select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` over `_tar_members`: files tagged with `__url__`, and after each
    shard an `_END` item ("" when the tar reader ended normally, else the error)."""
    for source in sources:
        url = source["url"]
        try:
            for member in _tar_members(source["stream"], max_bytes, handler, select_files):
                member["__url__"] = url
                yield member
            yield {_END: ""}
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), url)
            if not handler(exn):
                break
            yield {_END: f"{type(exn).__name__}"}


def _group(files: Iterable[dict], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples from tagged members (webdataset's `group_by_keys`, following `_members_of`'s sample
    boundaries): a repeated key is a new sample, counted as `duplicate_key`; at a bad end of a shard the
    last sample is dropped unless it has every member name the sample before it had."""
    current: dict[str, Any] | None = None
    number = -1
    previous: set[str] = set()
    for item in files:
        if _END in item:
            if current is not None and (not item[_END] or (previous and previous <= current.keys())):
                yield current
            current, previous = None, set()
            continue
        prefix, suffix = tariterators.base_plus_ext(item["fname"])
        if current is None or item[_SAMPLE] != number:
            if current is not None:
                previous = set(current)
                yield current
            if item[_REPEAT]:
                skips.skip(DUPLICATE_KEY, f"{item['__url__']}: key {prefix!r} again right after itself "
                                          f"(at {item['fname']}): read as a new sample")
            current, number = {"__key__": prefix, "__url__": item["__url__"]}, item[_SAMPLE]
        current[suffix.lower()] = item["data"]
    if current is not None:
        yield current


class _WatchedStream:
    """Read-through proxy that remembers size, first bytes and the last 64 KiB of a shard's byte stream
    (as the chunks read, not copied); `archive_end` is set by `_tar_members` when the tar reader stops."""

    def __init__(self, raw: Any, url: str) -> None:
        self.raw = raw
        self.url = url
        self.total = 0
        self.head = b""
        self.tail = b""
        self.recent: collections.deque[bytes] = collections.deque()
        self.recent_bytes = 0
        self.archive_end: int | None = None
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
        self.recent.append(data)
        self.recent_bytes += len(data)
        while self.recent_bytes - len(self.recent[0]) >= _RECENT:
            self.recent_bytes -= len(self.recent.popleft())

    def _data_after_end(self) -> bool:
        """Whether the bytes the tar reader read past the point where it stopped hold anything but zeros
        (a complete tar has only its end-of-archive marker and zero padding there)."""
        if self.archive_end is None:
            return False
        window = b"".join(self.recent)
        return bool(window[max(self.archive_end - (self.total - len(window)), 0):].strip(b"\0"))

    def finish(self) -> str | None:
        """Drain what the tar reader left and return why the shard looks incomplete or has data the tar
        reader did not read (None when fine)."""
        compressed = self.head.startswith(_COMPRESSED_MAGIC)  # offsets are then in the decompressed data
        after = not compressed and self._data_after_end()
        try:
            drained = 0
            while drained < _DRAIN_LIMIT and not after:
                chunk = self.raw.read(64 * 1024)
                if not chunk:
                    break
                self._note(chunk)
                drained += len(chunk)
                after = not compressed and self.archive_end is not None and bool(chunk.strip(b"\0"))
            else:
                if not after:
                    return None  # a long run of zeros after the archive: not a truncation
        except Exception as exc:  # e.g. a pipe: command that exited with an error status
            return f"error reading the end of the stream: {exc!r}"
        finally:
            self.close()
        if compressed:
            return None  # the decompressor reports truncation itself
        if self.total % _BLOCK and not after:
            return f"size {self.total} is not a multiple of {_BLOCK} bytes (truncated tar)"
        if after and self.total - self.archive_end < _BLOCK:  # the reader got less than a header block
            return (f"truncated inside a tar header: the shard ends at byte {self.total}, "
                    f"{self.total - self.archive_end} bytes into the {_BLOCK}-byte header at byte "
                    f"{self.archive_end} (truncated tar)")
        if after:
            return (f"the tar reader stopped at byte {self.archive_end}, but data follows (a corrupt header, "
                    f"or a second tar appended with `cat`?): the rest of the shard is ignored")
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
        url = next((a for a in exn.args if isinstance(a, str) and a in self.urls), None)
        if url is None:
            url = self.current.url if self.current is not None else "?"
        if isinstance(exn, OSError) and exn.strerror:  # args[0] is the errno: "IsADirectoryError: 21"
            why = exn.strerror + (f": {exn.filename}" if exn.filename else "")
        else:  # the stages append the stream and URL to args: str(exn) would print that tuple
            why = exn.args[0] if exn.args else ""
        self.bad(url, f"{type(exn).__name__}: {why}")
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
        """After the tar reader (`_expand`): at each clean end of a shard, check the tar is complete and
        has nothing after its end; a shard found bad here ends with why, for `_group`."""
        for item in files:
            if _END in item and not item[_END] and self.current is not None:
                why = self.current.finish()
                if why:
                    self.bad(self.current.url, why)
                    item = {_END: why}
            yield item


HTTP_STALL_S = 60
"""An http(s) shard that delivers no byte for this many seconds is abandoned (curl exits 28) and counted
as `bad_shard`; with the retries below, a dead server costs at most about 3 x this per shard."""
HTTP_RETRY_S = 120
"""curl retries transient failures (timeouts, 408/429/5xx) of an http(s) shard for up to this many
seconds after its first try (0: no retries), as webdataset's `--retry 30` did, but bounded."""


def _open_http(url: str, mode: str = "rb", bufsize: int = 8192) -> Any:
    """webdataset's `gopen_curl` for reading, plus a low-speed limit and a bounded retry window."""
    if mode[0] != "r":
        return gopen_curl(url, mode=mode, bufsize=bufsize)
    retry = ["--retry", "30", "--retry-delay", "2", "--retry-max-time", str(HTTP_RETRY_S)]
    args = ["curl", "--connect-timeout", "30", *(retry if HTTP_RETRY_S else []), "--speed-limit", "1",
            "--speed-time", str(HTTP_STALL_S), "-f", "-s", "-L", url]
    return Pipe(args, mode=mode, bufsize=bufsize, ignore_status=[141, 23])  # as gopen_curl: SIGPIPE


def _open_urls(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """`tariterators.url_opener`, with http(s) URLs opened by `_open_http` (all else as before)."""
    for source in sources:
        url = source["url"]
        target = rewrite_url(url)  # webdataset's GOPEN_REWRITE rules, as gopen applies them
        if not re.match(r"https?://", target, re.IGNORECASE):
            yield from tariterators.url_opener([source], handler=handler)
            continue
        try:
            source.update(stream=_open_http(target))
        except Exception as exn:  # as url_opener: the URL goes into args, for the handler
            exn.args = (*exn.args, url)
            if not handler(exn):
                break
            continue
        yield source


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
        partial(_open_urls, handler=errors),
        errors.watch,
        partial(_expand, max_bytes=max_bytes, handler=errors, select_files=select_files),
        errors.check_ends,
        partial(_group, skips=skips),
    )
    return iter(pipeline)
