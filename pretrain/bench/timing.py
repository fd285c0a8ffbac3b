"""The timing loop both sides of a step benchmark use: `warmup` untimed then `steps` timed optimizer
steps of `grad_accum` micro-batches, each split into data / forward / backward / optimizer phases with a
device sync at every boundary (so GPU time lands in the phase that queued it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(device: torch.device, steps: int, warmup: int, grad_accum: int, data: Callable[[], Any],
                forward: Callable[[Any], Any], backward: Callable[[Any], None],
                optimizer: Callable[[int], None]) -> dict[str, Any]:
    """Run the loop; `optimizer(i)` gets the micro-batch index within the step (DeepSpeed steps on every
    call, a plain optimizer only on the last). Returns timed micro-batches, wall and process-CPU seconds,
    seconds per phase, and the last forward output."""
    phases = dict.fromkeys(PHASES, 0.0)
    micro, t_start, c_start, out = 0, 0.0, 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            phases = dict.fromkeys(PHASES, 0.0)
            t_start, c_start = time.perf_counter(), time.process_time()
        for i in range(grad_accum):
            t0 = time.perf_counter()
            batch = data()
            sync(device)
            t1 = time.perf_counter()
            out = forward(batch)
            sync(device)
            t2 = time.perf_counter()
            backward(out)
            sync(device)
            t3 = time.perf_counter()
            optimizer(i)
            sync(device)
            t4 = time.perf_counter()
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k] += dt
            micro += step >= warmup
    return {"micro": micro, "wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start,
            "phases": phases, "last": out}
