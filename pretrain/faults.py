"""Fault injection for reliability tests: crash a process at a named point, or poison a loss.

Driven by environment variables so tests can hit real code paths inside real launched jobs; unset in
normal runs, where every function here is a cheap no-op.

- `MMPT_FAULT_KILL=point:step[:rank]`  SIGKILL this process at `point` (e.g. `save-before-commit`,
  `after-step`) when training reaches `step` (on `rank` only, if given).
- `MMPT_FAULT_WRITE=step[:rank[:name]]`  fail this process's checkpoint file writes in the save at `step`
  with an I/O error, as a full or broken disk would (on `rank` only, if given; only files whose name
  contains `name`, if given, e.g. `optim_states`).
- `MMPT_FAULT_SIGNAL=step[:rank]`  send this process SIGUSR1 (a scheduler's stop request) right after
  optimizer step `step` (on `rank` only, if given).
- `MMPT_FAULT_HOLD=step:path[,step:path]`  after optimizer step `step`, wait until `path` exists (a
  site that is slow at moments the test chooses: cross-site rejoin tests keep a survivor running this way).
- `MMPT_FAULT_NONFINITE=objective:n[,n...]`  make that objective's loss NaN in the n-th micro-batch the
  process runs (1-based, skipped ones included; with grad_accum=1 and no earlier skip, n is the step).
"""

from __future__ import annotations

import errno
import os
import signal
import time

import torch


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("MMPT_FAULT_KILL")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return
    if len(parts) > 2 and int(parts[2]) != _rank():
        return
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(step: int) -> None:
    """Send SIGUSR1 to this process after `step`, as configured by `MMPT_FAULT_SIGNAL`."""
    spec = os.environ.get("MMPT_FAULT_SIGNAL")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != step or (len(parts) > 1 and int(parts[1]) != _rank()):
        return
    os.kill(os.getpid(), signal.SIGUSR1)


def maybe_hold(step: int) -> None:
    """Wait after `step` until the file `MMPT_FAULT_HOLD` names for it exists (polling; no-op when unset).
    Several holds: `step:path,step:path`."""
    spec = os.environ.get("MMPT_FAULT_HOLD")
    if not spec:
        return
    for item in spec.split(","):
        at, path = item.split(":", 1)
        while int(at) == step and not os.path.exists(path):
            time.sleep(0.2)


def maybe_fail_write(step: int, path: str | os.PathLike) -> None:
    """Raise an I/O error for a checkpoint file write, as configured by `MMPT_FAULT_WRITE`."""
    spec = os.environ.get("MMPT_FAULT_WRITE")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != step or (len(parts) > 1 and parts[1] and int(parts[1]) != _rank()):
        return
    if len(parts) > 2 and parts[2] not in os.path.basename(path):
        return
    raise OSError(errno.EIO, f"injected write failure (MMPT_FAULT_WRITE) on rank {_rank()}", str(path))


_MICRO = [0]


def poison(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `out` with the configured objective's loss (and the total) replaced by NaN when this is
    one of the configured micro-batches."""
    spec = os.environ.get("MMPT_FAULT_NONFINITE")
    if not spec:
        return out
    _MICRO[0] += 1
    objective, which = spec.split(":", 1)
    if _MICRO[0] not in {int(n) for n in which.split(",") if n}:
        return out
    key = f"loss_{objective}"
    if key not in out:
        return out
    nan = torch.full_like(out[key], float("nan"))
    return {**out, key: nan, "loss": out["loss"] + nan}
