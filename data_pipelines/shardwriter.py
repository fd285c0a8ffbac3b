"""Writing WebDataset shards with size limits, deterministic tar headers and a sizes.json sidecar.

Shards are plain POSIX tar files (`tar tf` lists them, plain `webdataset` reads them): members
`KEY.EXT`, fixed mtime/owner so identical input gives identical bytes. Each shard is written under a
temporary name and renamed when complete, so a crashed import never leaves a truncated shard that looks
finished; sizes.json is written only when the writer is closed without an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds

from .files import write_text_atomic

TAR_MTIME = 946684800  # 2000-01-01, as in synth: tar bytes do not depend on when they were written
_BLOCK = 512
_TAR_END = 10240  # end-of-archive blocks, padded to tarfile's record size


def sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes `sample` adds to a tar: a header block per member plus its payload rounded up to blocks
    (names over 100 characters add an extended header, which this ignores)."""
    return sum(_BLOCK + -(-len(v) // _BLOCK) * _BLOCK for k, v in sample.items() if not k.startswith("__"))


class ShardWriter:
    """Writes `OUT/{prefix}-000000.tar ...`, starting a new shard at `max_samples` samples or before a
    sample would push it past `max_bytes` (0: no byte limit); `close()` writes sizes.json."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_samples: int = 10000,
                 max_bytes: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"samples per shard must be >= 1, got {max_samples}")
        if max_bytes < 0:
            raise ValueError(f"shard bytes must be >= 0, got {max_bytes}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._stream: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._bytes = 0
        self._tmp: Path | None = None
        self._final: Path | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._final, self._tmp = self.out / name, self.out / f".{name}.tmp"
        self._stream = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_tar
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=TAR_MTIME, user="", group="",
                                  mode=0o644)
        self._count = self._bytes = 0

    def _close_tar(self) -> None:
        self._tar.close()  # TarWriter does not close a stream it did not open
        self._stream.close()
        self._tar = self._stream = None

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._close_tar()
        size = self._tmp.stat().st_size
        os.replace(self._tmp, self._final)
        self.shards.append({"name": self._final.name, "samples": self._count, "bytes": size})

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (`__key__` plus extension -> bytes)."""
        size = sample_bytes(sample)
        if self._tar is not None:
            full = self._count >= self.max_samples
            too_big = self.max_bytes and self._bytes + size + _TAR_END > self.max_bytes
            if full or too_big:
                self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard, write sizes.json; returns [{name, samples, bytes}] per shard."""
        self._finish()
        sizes = {s["name"]: s["samples"] for s in self.shards}
        write_text_atomic(self.out / "sizes.json", json.dumps(sizes, indent=1) + "\n")
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
            return
        # failing: no sizes.json (the shards so far are not a finished output), no half-written shard
        if self._tar is not None:
            self._close_tar()
            self._tmp.unlink(missing_ok=True)
