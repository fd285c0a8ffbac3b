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
