"""Model-state bytes a rank actually holds inside a DeepSpeed engine (to check `pretrain plan` against).

Reads DeepSpeed's own buffers rather than `model.parameters()`, because under ZeRO-3 a parameter's
`.data` is an empty placeholder between forward passes and the rank's share lives in `ds_tensor`, its
gradient share in one flat buffer and the optimizer's fp32 master and moments in flat partitions.
Optimizer moments exist only after the first step (torch's AdamW creates them lazily): measure then.
Also process RSS now and at its peak (VmHWM), which the benches and `pretrain convert` report.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in a torch optimizer's per-parameter state (moments, step counters)."""
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += _bytes(v)
    return total


def measure_model_states(engine: Any) -> dict[str, Any]:
    """{params, grads, optimizer, total} bytes held by this rank, plus `local_params` (elements this rank
    owns before any ZeRO partitioning, i.e. its tensor-parallel share) and `how` (what was measured).

    ZeRO-3: parameter partitions (+ whole persistent parameters), the flat gradient-partition buffer,
    the fp32 master partitions that are separate copies (bf16/fp16) and the AdamW moments. Other stages:
    the module's parameters and the optimizer's tensors; gradients are not held between steps there, so
    they are reported as None.
    """
    params = list(engine.module.parameters())
    zero3 = bool(params) and hasattr(params[0], "ds_tensor")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if zero3:
        local = sum(int(p.ds_numel) for p in params)
        p_bytes = sum(_bytes(p.ds_tensor) + (p.ds_numel * p.ds_tensor.element_size()
                                             if getattr(p, "ds_persist", False) else 0) for p in params)
        grads = getattr(opt, "grad_partitions_flat_buffer", None)
        g_bytes: int | None = _bytes(grads)
        own = {t.data_ptr() for t in getattr(opt, "fp16_partitioned_groups_flat", [])}
        master = sum(_bytes(t) for t in getattr(opt, "fp32_partitioned_groups_flat", [])
                     if t.data_ptr() not in own)
        how = "zero3: ds_tensor partitions, grad partition buffer, fp32 master copies, optimizer state"
    else:
        local = sum(p.numel() for p in params)
        p_bytes = sum(_bytes(p.data) for p in params)
        g_bytes = None
        master = 0
        # ZeRO 1-2 and BF16_Optimizer: flat fp32 partitions; ZeRO 0 under bf16/fp16: FP16_Optimizer's flat
        # masters, FP16_UnfusedOptimizer's one fp32 copy per parameter (lists of tensors)
        for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_groups_flat",
                     "fp32_groups"):
            for t in getattr(opt, attr, None) or []:
                master += sum(_bytes(x) for x in ([t] if isinstance(t, torch.Tensor) else
                                                  t if isinstance(t, list | tuple) else [])
                              if isinstance(x, torch.Tensor))
        how = "module parameters, fp32 master partitions, optimizer state (gradients not measured)"
    o_bytes = master + _state_bytes(inner)
    total = p_bytes + o_bytes + (g_bytes or 0)
    return {"params": p_bytes, "grads": g_bytes, "optimizer": o_bytes, "total": total,
            "local_params": local, "how": how}


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * resource.getpagesize() / 2**20, 1)


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: that survives exec and so reports the
    parent's footprint for a child started by a large process (e.g. `bench ckpt`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
