"""Weights-only loading: nothing in a checkpoint file ever runs.

Checkpoints travel between clusters and users, so no file is unpickled: every load, ours and DeepSpeed's
(its checkpoint engine behind `engine.load_checkpoint`, zero_to_fp32, its universal loaders, all of which
turn weights-only loading off), accepts only tensors, containers and a few allow-listed DeepSpeed records.
A file holding anything else raises `UnsafeCheckpointError` naming it; a damaged one a ValueError naming
it. `check_loadable` parses files up front (memory-mapped: only their pickles are read) so callers can
refuse a checkpoint before handing it to DeepSpeed (`atomic.verify_for_load`, `sources.DeepSpeedSource`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoint files pickle: enums, loss-scaler records and (ZeRO 1-2
    optimizer states) the `fragment_address` (numel, start) records of each parameter's slice."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class UnsafeCheckpointError(ValueError, pickle.UnpicklingError):
    """A checkpoint file holds code or objects other than tensors, containers and DeepSpeed's allow-listed
    records: refused without running anything in it."""


def _why_refused(error: BaseException) -> str:
    """What torch's weights-only refusal found, in a few words (e.g. `unsupported global posix.system`)."""
    text = str(error)
    m = re.search(r"GLOBAL (\S+)", text)
    if m:
        return f"unsupported global {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return m.group(1).strip()[:300]
    parts = [p.strip() for p in text.split("\n\n") if p.strip()
             and not p.strip().startswith(("Weights only load failed", "Check the documentation"))]
    return (parts[0] if parts else text.strip() or type(error).__name__).splitlines()[0][:300]


def load_error(path: Any, error: BaseException) -> Exception:
    """Our error, naming the file, for a failed weights-only torch.load of `path`."""
    if isinstance(error, (UnsafeCheckpointError, FileNotFoundError)):
        return error
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return UnsafeCheckpointError(f"{path}: refused: contains code or objects that are not tensors "
                                     f"({_why_refused(error)}); checkpoints are never unpickled")
    return ValueError(f"{path}: cannot be read as a checkpoint file ({type(error).__name__}: {error})")


def _load(f: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's own loader (`torch.serialization.load`, never a patched `torch.load`) with weights_only=True
    and only DeepSpeed's allow-listed records; any failure raised naming the file."""
    kwargs["weights_only"] = True
    kwargs.pop("pickle_module", None)  # a custom unpickler is exactly what weights_only rules out
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.serialization.load(f, *args, **kwargs)
    except Exception as e:  # torch reports refusals and damage with many exception types
        raise load_error(os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f), e) from None


@contextlib.contextmanager
def weights_only_loads():
    """Force `weights_only=True` on every torch.load in the block, DeepSpeed's own readers included.

    DeepSpeed's checkpoint engine (`engine.load_checkpoint`), zero_to_fp32 and universal loaders turn
    weights-only loading off (full unpickling, i.e. arbitrary code from a file). Checkpoints travel between
    clusters and users, so we never unpickle them: only tensors, containers and the allow-listed DeepSpeed
    records above are accepted, and a file holding anything else raises `UnsafeCheckpointError` naming it."""
    original = torch.load
    torch.load = _load
    try:
        yield
    finally:
        torch.load = original


def safe_load(path: str | Path) -> Any:
    """Weights-only torch.load of a whole checkpoint file; a damaged or refused file is reported by name."""
    return _load(path, map_location="cpu")


def mmap_load(path: Path) -> Any:
    """Safe, lazy torch.load of a checkpoint file (tensors memory-mapped: slicing reads only those
    pages); a damaged or refused file is reported by name."""
    return _load(path, map_location="cpu", mmap=True)


def check_loadable(files: Iterable[Path]) -> None:
    """Parse each file weights-only (memory-mapped: only its pickle is read, not its tensor data) and
    raise `UnsafeCheckpointError` / ValueError naming the first one that holds code or cannot be read.

    Run before handing files to a reader that is only kept weights-only by `weights_only_loads`
    (DeepSpeed's), so a bad file is refused by name, on the ranks that agree to stop, before any load."""
    for f in files:
        _load(f, map_location="cpu", mmap=zipfile.is_zipfile(f))
