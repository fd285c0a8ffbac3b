"""DeepSpeed's comms logger, per optimizer step: what `pretrain plan --comm` is checked against.

Enabled only when `MMPT_COMMS_LOG=PATH` is set (tests; off in normal runs, where it costs nothing): the
DeepSpeed config gets a `comms_logger` section with `prof_all`, and after each optimizer step the
trainer calls `CommsProbe.after_step`, which snapshots the logger's running totals. At the end each rank
writes PATH.rank{R}.json: {step: {op: {"calls": n, "msg_bytes": b}}} for the traffic *of that step*.

What the logger counts (deepspeed/comm/comm.py `timed_op`, deepspeed/comm/utils.py
`get_msg_size_from_args`, deepspeed/utils/comms_logging.py): every collective called through
`deepspeed.comm` (ZeRO's parameter all-gathers, gradient reduce-scatters, the grad-norm and overflow
all-reduces, start-up broadcasts), recorded under its op name with a "message size" in bytes that is the
size of the op's `tensor` argument: the *input*. For `all_gather_into_tensor` that is this rank's shard
(1/n of what is gathered), for `reduce_scatter_tensor` the whole input (n times what each rank keeps),
for `all_reduce` the reduced tensor. Collectives called through `torch.distributed` directly (our
contrastive feature gather in parallel/collectives.py, megatron-core's tensor-parallel all-reduces,
`all_gather_object`) are not seen by it.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "MMPT_COMMS_LOG"


def logger_section() -> dict[str, Any] | None:
    """The DeepSpeed `comms_logger` config section when the probe is on, else None."""
    if not os.environ.get(ENV):
        return None
    return {"enabled": True, "verbose": False, "prof_all": True, "debug": False}


class CommsProbe:
    """Per-step deltas of the comms logger's totals (a no-op unless `MMPT_COMMS_LOG` is set)."""

    def __init__(self) -> None:
        self.path = os.environ.get(ENV)
        self._last: dict[str, tuple[int, int]] = {}
        self.steps: dict[int, dict[str, dict[str, int]]] = {}
        self._last = self._totals() if self.path else {}

    @staticmethod
    def _totals() -> dict[str, tuple[int, int]]:
        from deepspeed.comm import comms_logger

        out: dict[str, tuple[int, int]] = {}
        for name, by_size in comms_logger.comms_dict.items():
            calls = sum(v[0] for v in by_size.values())
            size = sum(int(msg) * v[0] for msg, v in by_size.items())
            out[name] = (calls, size)
        return out

    def after_step(self, step: int) -> None:
        if not self.path:
            return
        now = self._totals()
        delta = {}
        for name, (calls, size) in now.items():
            c0, s0 = self._last.get(name, (0, 0))
            if calls > c0:
                delta[name] = {"calls": calls - c0, "msg_bytes": size - s0}
        self.steps[step] = delta
        self._last = now

    def dump(self, rank: int) -> None:
        if self.path:
            with open(f"{self.path}.rank{rank}.json", "w") as fh:
                json.dump(self.steps, fh)
