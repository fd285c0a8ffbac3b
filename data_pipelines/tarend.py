"""Watching a shard's byte stream so a tar that ends badly is noticed (used by `shardstream`).

Python's streaming tar reader stops *silently* at a truncation that falls on a header boundary, at a
corrupt header and at a second tar appended with `cat`. `WatchedStream` sits between the opener and the
tar reader, remembers what went through, and when the reader stops drains the rest and says why the shard
looks incomplete: a complete tar ends with the end-of-archive marker (two zero blocks) and only zeros after
it. Compressed shards are left to the decompressor, which reports truncation itself.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any

_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_DRAIN_LIMIT = 1 << 20
_RECENT = 64 * 1024  # bytes of a shard kept to check what the tar reader buffered past the archive's end
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class WatchedStream:
    """Read-through proxy that remembers size, first bytes and the last 64 KiB of a shard's byte stream
    (as the chunks read, not copied); `archive_end` is set by `_tar_members` when the tar reader stops."""

    def __init__(self, raw: Any, url: str) -> None:
        self.raw, self.url, self.total, self.head, self.tail = raw, url, 0, b"", b""
        self.recent: collections.deque[bytes] = collections.deque()
        self.recent_bytes, self.closed_by_us = 0, False
        self.archive_end: int | None = None

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
