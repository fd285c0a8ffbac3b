"""Tensor files that are written one tensor at a time and checked before they are trusted.

* `SafetensorsWriter` streams tensors into a standard `.safetensors` file: the header (names, dtypes,
  shapes, offsets) is known before any data (shapes come from checkpoint metadata), so each tensor is
  written and dropped as soon as it is produced and peak memory is one tensor, not the model.
* `manifest.json` lists every file of an output folder with its size and sha256 and, for tensor files,
  every tensor's dtype, shape, size and sha256. It is written last, so a folder without it is
  incomplete, and `verify_manifest` refuses a folder whose files do not match, naming the file.
* `staged_output` writes into `<dst>.tmp-<pid>` and renames it into place only when complete, so a crash
  never leaves a half-written folder under the user's name and never touches an existing one.

Any safetensors reader (Python, Rust, transformers, open_clip) reads these files; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

MANIFEST = "manifest.json"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_CHUNK = 16 << 20


class IntegrityError(ValueError):
    """A checkpoint or export file does not match its manifest (corrupt, truncated, or replaced)."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors")
    return _DTYPES[dtype]


class SafetensorsWriter:
    """Write `specs` = [(name, dtype, shape), ...] to `path` in that order, one `write(name, t)` each."""

    def __init__(self, path: Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, dtype, shape in specs:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._fh: BinaryIO = self.path.open("wb")
        self._file_hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self.tensors: dict[str, dict[str, Any]] = {}

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._file_hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next spec's."""
        want, dtype, shape, nbytes = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: expected {want} {dtype} {shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.sha256()
        for start in range(0, nbytes, _CHUNK):
            part = memoryview(data[start:start + _CHUNK])
            digest.update(part)
            self._emit(part)
        self.tensors[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "bytes": nbytes,
                              "sha256": digest.hexdigest()}
        self._next += 1

    def close(self) -> dict[str, Any]:
        """Finish the file (fsynced); return its manifest entry."""
        if self._next != len(self._order):
            missing = [n for n, *_ in self._order[self._next:]]
            raise ValueError(f"{self.path.name}: {len(missing)} tensors never written, e.g. {missing[:3]}")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return {"bytes": self.path.stat().st_size, "sha256": self._file_hash.hexdigest(),
                "tensors": self.tensors}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Small files (and tests): write a whole dict; returns the manifest entry."""
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    for k, v in tensors.items():
        writer.write(k, v)
    return writer.close()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """Manifest entry of a non-tensor file (JSON, tokenizer)."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def write_manifest(folder: Path, entries: dict[str, dict[str, Any]], **extra: Any) -> None:
    """Write `manifest.json` last (fsynced): every file not yet in `entries` is hashed and added."""
    folder = Path(folder)
    files = dict(entries)
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            files[rel] = file_entry(p)
    body = {"format": "mmpt-manifest", "version": 1, **extra, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{folder}: no {MANIFEST}; the folder is incomplete (its writer did not finish) "
                             "or was not written by mmpt")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None


def verify_manifest(folder: Path, hashes: bool = True) -> dict[str, Any]:
    """Check every listed file exists with its size (and sha256); raise IntegrityError naming the file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(f"{path}: {size} bytes, {MANIFEST} says {entry['bytes']} "
                                 "(truncated or replaced)")
        if hashes and file_sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: sha256 does not match {MANIFEST}: the file is corrupt; "
                                 "refusing to load it")
    return manifest


def fsync_file(path: Path) -> None:
    """Make a written file durable (its data reaches the disk before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """A directory's entries (renames) are made durable by fsyncing the directory itself."""
    fsync_file(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` through a fsynced temporary file and a rename: a reader (or a kill at any
    point) sees the old content or the new one, never a half-written file (pointers such as `latest`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def staged_output(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `dst` (replacing it only if `overwrite`).

    On any error the temporary folder is removed and `dst` is untouched."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; choose a new output path (or pass --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)
