"""DeepSpeed's checkpoint writes with their errors deferred: see `deferred_write_errors`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from pretrain import faults

log = logging.getLogger("mmpt.checkpoint")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def deferred_write_errors(engine: Any, step: int) -> Iterator[list[BaseException]]:
    """While DeepSpeed saves, a failed file write on this rank is recorded in the yielded list instead of
    raised, and this rank's remaining writes are skipped.

    Raised from inside `engine.save_checkpoint`, the error would leave this rank out of the collectives
    DeepSpeed still runs after the writes (the all_gather of persistent parameters, the closing barrier)
    while the other ranks wait in them until the timeout. Deferred, every rank finishes `save_checkpoint`
    and the ranks then agree on the outcome."""
    errors: list[BaseException] = []
    ce = engine.checkpoint_engine

    def guard(write: Any, name_of: Any, file_write: bool) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if errors:
                return None
            try:
                if file_write:
                    faults.maybe_fail_write(step, name_of(*args, **kwargs))
                return write(*args, **kwargs)
            except Exception as e:  # full disk, quota, permissions, I/O (torch.save says RuntimeError)
                log.error("rank %d: writing %s failed: %s", _rank(), name_of(*args, **kwargs), e)
                errors.append(e)
                return None
        return guarded

    patches = [  # (object, attribute, the path argument of a call, whether it writes one checkpoint file)
        (ce, "save", lambda state_dict=None, path="", *a, **k: path, True),
        (ce, "makedirs", lambda path="", *a, **k: path, False),
        (engine, "_copy_recovery_script", lambda save_path="", *a, **k: save_path, False),
    ]
    patched = []
    try:
        for obj, attr, name_of, file_write in patches:
            if hasattr(obj, attr):
                patched.append((obj, attr, attr in vars(obj), getattr(obj, attr)))
                setattr(obj, attr, guard(getattr(obj, attr), name_of, file_write))
        yield errors
    finally:
        for obj, attr, own, original in reversed(patched):
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # the class's method shows through again
