"""Load full single-device tensors (a universal checkpoint or imported weights) into a ZeRO-3 engine of
any data- x tensor-parallel layout.

For each parameter, in the order the ZeRO-3 optimizer packs its flat fp32 partitions: take the full
tensor, cut this rank's TP slice along the parameter's `tp_split_dim` (the same cut `pretrain.parallelize`
makes after the model is built), pad it to a multiple of the DP size and keep this DP rank's equal part. The
fp32 master weights, both Adam moments and the step counter are set this way; then the working-precision
partitions are refreshed from the master weights, exactly as after an optimizer step. One parameter is
in memory at a time. DeepSpeed's own universal loader unpickles its files and re-slices TP only for its
AutoTP; this needs neither.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from parallel import groups

KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _tp_slice(full: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None or groups.tp_size() == 1:
        return full
    return full.chunk(groups.tp_size(), dim=dim)[groups.tp_rank()]


def _dp_part(local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    flat = local.reshape(-1)
    part = math.ceil(flat.numel() / world)
    if part * world != flat.numel():
        flat = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
    return flat[rank * part:(rank + 1) * part]


def _stage3_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        raise ValueError("loading a universal checkpoint or imported weights needs ZeRO stage 3 "
                         "(parallel.zero_stage=3, the default)")
    return opt


def load_full_tensors(engine: Any, tensor: Any, layout: dict[str, dict[str, Any]],
                      keys: tuple[str, ...] = KEYS) -> int:
    """Set `keys` of every parameter from `tensor(name, key)` (full single-device tensors); return count.

    `keys` = ("fp32",) loads weights only (imports): Adam moments keep their fresh zeros."""
    opt = _stage3_optimizer(engine)
    names = {p: n for n, p in engine.module.named_parameters()}
    missing = [n for n in names.values() if n not in layout]
    if missing:
        raise ValueError(f"the checkpoint has no tensors for {len(missing)} parameters of this model, "
                         f"e.g. {missing[:3]}; was it written for another model config?")
    opt.checkpoint_event_prologue()
    count = 0
    for sub, params in enumerate(opt.fp16_groups):
        fp32_flat = opt.fp32_partitioned_groups_flat[sub]
        bufs = {k: torch.zeros_like(fp32_flat) for k in keys}
        offset = 0
        for p in params:
            name = names[p]
            group = opt._get_param_partition_group(p)
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            want = list(layout[name]["shape"])
            for key in keys:
                full = tensor(name, key)
                if list(full.shape) != want:
                    raise ValueError(f"{name}: checkpoint tensor {key} has shape {tuple(full.shape)}, "
                                     f"expected {tuple(want)}")
                local = _tp_slice(full.float(), layout[name]["tp_split_dim"])
                if local.numel() != p.ds_numel:
                    raise ValueError(f"{name}: TP slice of {local.numel()} elements, this rank's parameter "
                                     f"has {p.ds_numel}")
                piece = _dp_part(local, rank, world)
                bufs[key][offset:offset + piece.numel()].copy_(piece)
                if piece.numel() != p.ds_tensor.ds_numel:
                    raise RuntimeError(f"{name}: DP part of {piece.numel()} elements, ZeRO-3 holds "
                                       f"{p.ds_tensor.ds_numel}")
            offset += p.ds_tensor.ds_numel
            count += 1
        if offset != fp32_flat.numel():
            raise RuntimeError(f"ZeRO-3 group {sub}: filled {offset} of {fp32_flat.numel()} elements")
        if "fp32" in bufs:
            fp32_flat.data.copy_(bufs["fp32"])
        state = opt.optimizer.state[fp32_flat]
        for key in keys:
            if key != "fp32":
                state[key] = bufs[key]
        # working-precision partitions follow the master weights (what an optimizer step does)
        opt.fp16_partitioned_groups_flat[sub].data.copy_(fp32_flat.data)
        for partitioned, q in zip(opt.fp16_partitioned_groups[sub],
                                  opt.unflatten(opt.fp16_partitioned_groups_flat[sub],
                                                opt.fp16_partitioned_groups[sub])):
            partitioned.data = q.data
    opt.checkpoint_event_epilogue()
    return count


def load_universal(engine: Any, src: Any) -> None:
    """Weights, Adam moments and step, LR schedule and loss scale of universal source `src` into `engine`."""
    meta = src.meta
    load_full_tensors(engine, src.tensor, meta["params"])
    opt = engine.optimizer
    step = torch.tensor(float(meta.get("optimizer_step") or meta["step"]))
    for fp32_flat in opt.fp32_partitioned_groups_flat:
        opt.optimizer.state[fp32_flat]["step"] = step.clone()
    saved_groups = meta.get("param_groups") or []
    if len(saved_groups) == len(opt.optimizer.param_groups):
        for group, saved in zip(opt.optimizer.param_groups, saved_groups):
            group["lr"] = saved["lr"]
    if meta.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for k, v in (meta.get("loss_scaler") or {}).items():
        if hasattr(opt, "loss_scaler") and hasattr(opt.loss_scaler, k):
            setattr(opt.loss_scaler, k, v)
    engine.global_steps = int(meta["step"])
    engine.global_samples = int(meta.get("global_samples") or 0)
    engine.skipped_steps = int(meta.get("skipped_steps") or 0)
