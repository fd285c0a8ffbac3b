"""Agreement between ranks on a local condition, e.g. "a stop signal arrived here".

Signals reach ranks at slightly different moments (or only some ranks); if each acted alone, one
would leave the loop while the others block in the next collective. One all_reduce(MAX) of a single
integer per check makes every rank take the same decision at the same step. The same agreement, repeated,
lets the other ranks wait for a long piece of work on rank 0 (`on_rank0`) without a collective timing out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def any_rank(flag: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when `flag` is True on at least one rank (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def from_rank0(obj: T, group: dist.ProcessGroup | None = None) -> T:
    """Rank 0's `obj` on every rank (one broadcast of a small picklable object; no-op without a process
    group): a decision rank 0 takes alone (which sites joined a round, a probe fitted once) that every rank
    must act on identically."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu",
                   group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise sum of a few floats over the ranks (one float64 all_reduce; no-op without a group)."""
    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def failures_by_rank(error: BaseException | str | None, group: dist.ProcessGroup | None = None) -> list[str]:
    """Every rank's error (`rank R: message`, empty when none failed), on every rank: one all_gather of a
    small object, for a step that can fail on some ranks only (a checkpoint write). Every rank must call it,
    whatever happened to it, so that the ranks then act together."""
    mine = None if error is None else str(error) or type(error).__name__
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        every = [mine]
    else:
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
    return [f"rank {r}: {e}" for r, e in enumerate(every) if e is not None]


def sum_counts(local: dict[str, int], group: dist.ProcessGroup | None = None) -> dict[str, int]:
    """Every rank's {name: count} summed by name, on every rank (one all_gather of a small dict: the names
    need not be the same on every rank); every rank of `group` must call it."""
    every: list[Any] = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, dict(local), group=group)
    total: dict[str, int] = {}
    for counts in every:
        for name, n in (counts or {}).items():
            total[name] = total.get(name, 0) + int(n)
    return dict(sorted(total.items()))


def on_rank0(fn: Callable[[], T], poll_s: float = 0.5) -> tuple[T | None, Exception | None]:
    """Run `fn` on rank 0 while the other ranks wait for it, however long it takes: rank 0 runs it in a
    thread and every rank joins a one-integer all_reduce each `poll_s` seconds until it has finished. (One
    collective held open instead, e.g. `failures_by_rank` at once, would fail after the process group's
    timeout when `fn` is a long conversion.) Returns rank 0's (result, exception), (None, None) elsewhere;
    every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        try:
            return fn(), None
        except Exception as e:
            return None, e
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except Exception as e:  # reported to the caller, which tells every rank
            box["error"] = e

    thread = None
    if dist.get_rank() == 0:
        thread = threading.Thread(target=work, name="mmpt-rank0-work", daemon=True)
        thread.start()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    while not any_rank(thread is not None and not thread.is_alive(), device):
        time.sleep(poll_s)
    return box.get("result"), box.get("error")
