"""Agreement between ranks on a local condition, e.g. "a stop signal arrived here".

Signals reach ranks at slightly different moments (or only some ranks); if each acted alone, one
would leave the loop while the others block in the next collective. One all_reduce(MAX) of a single
integer per step makes every rank take the same decision at the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flag: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when `flag` is True on at least one rank (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


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
