"""Load full single-device tensors (a universal checkpoint or imported weights) into a ZeRO 1-3 engine of
any data- x tensor-parallel layout.

ZeRO-3: for each parameter, in the order the optimizer packs its flat fp32 partitions, take the full
tensor, cut this rank's TP slice along the parameter's `tp_split_dim` (the same cut `pretrain.parallelize`
makes after the model is built), pad it to a multiple of the DP size and keep this DP rank's equal part. The
fp32 master weights, both Adam moments and the step counter are set this way; then the working-precision
partitions are refreshed from the master weights, exactly as after an optimizer step.

ZeRO 1-2: every rank holds the whole working-precision model and one contiguous range of the flattened
fp32 master weights and moments; DeepSpeed records for each parameter which fragment of it lies in this
rank's range (`_hp_mapping`), so the TP slice is copied whole into the working copy and that fragment into
the master weights and moments.

Frozen parameters (`train.freeze`) are in no optimizer group: only their weights are set (ZeRO-3: this DP
rank's `ds_tensor` partition, persistent ones re-gathered by DeepSpeed's checkpoint epilogue; ZeRO 1-2: the
working copy), whatever the checkpoint held for them. A parameter frozen in the checkpoint but trained now
starts from zero moments (the source returns zeros for them), as Adam would.

One parameter is in memory at a time. DeepSpeed's own universal loader unpickles its files and re-slices
TP only for its AutoTP; this needs neither.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from parallel import groups
from pretrain.checkpoint.hparams import set_schedule

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


def _zero12_groups(opt: Any) -> tuple[list[list[Any]], list[torch.Tensor]] | None:
    """(working-precision parameters, flat fp32 partition) per group of a ZeRO 1-2 optimizer, else None."""
    lp, hp = getattr(opt, "bit16_groups", None), getattr(opt, "single_partition_of_fp32_groups", None)
    return (lp, hp) if lp is not None and hp is not None else None


def _checked_names(engine: Any, layout: dict[str, dict[str, Any]], fresh: frozenset[str]) -> dict[Any, str]:
    if not (hasattr(engine.optimizer, "fp32_partitioned_groups_flat") or _zero12_groups(engine.optimizer)):
        raise ValueError("loading a universal checkpoint or imported weights needs a ZeRO-partitioned "
                         "optimizer: parallel.zero_stage=1, 2 or 3 (3 is the default), not 0")
    names = {p: n for n, p in engine.module.named_parameters() if n not in fresh}
    missing = [n for n in names.values() if n not in layout]
    if missing:
        raise ValueError(f"the checkpoint has no tensors for {len(missing)} parameters of this model, "
                         f"e.g. {missing[:3]}; was it written for another model config?")
    return names


def _local(tensor: Any, name: str, key: str, entry: dict[str, Any], numel: int) -> torch.Tensor:
    """This TP rank's slice of `name`'s full `key` tensor, shape-checked against the layout and the rank's
    parameter of `numel` elements."""
    full = tensor(name, key)
    if list(full.shape) != list(entry["shape"]):
        raise ValueError(f"{name}: checkpoint tensor {key} has shape {tuple(full.shape)}, "
                         f"expected {tuple(entry['shape'])}")
    local = _tp_slice(full.float(), entry["tp_split_dim"])
    if local.numel() != numel:
        raise ValueError(f"{name}: TP slice of {local.numel()} elements, this rank's parameter has {numel}")
    return local


def _create_adam_state(inner: Any, flats: list[torch.Tensor]) -> None:
    """Adam creates its moments at the first step; create them now, with the optimizer's own dtypes and
    devices, by one step on zero gradients at learning rate 0 (which moves no weight, weight decay
    included), so that they can be overwritten."""
    if all(inner.state.get(f) for f in flats):
        return
    lrs = [g["lr"] for g in inner.param_groups]
    grads = [f.grad for f in flats]  # ZeRO's CPU offload keeps its own gradient buffers there
    for g in inner.param_groups:
        g["lr"] = 0.0
    for f, grad in zip(flats, grads):
        f.grad = torch.zeros_like(f) if grad is None else grad.zero_()
    inner.step()
    for g, lr in zip(inner.param_groups, lrs):
        g["lr"] = lr
    for f, grad in zip(flats, grads):
        f.grad = grad


@torch.no_grad()
def _load_zero12(engine: Any, tensor: Any, layout: dict[str, dict[str, Any]], keys: tuple[str, ...],
                 names: dict[Any, str]) -> int:
    """ZeRO 1-2 (see the module docstring); returns the number of parameters set."""
    opt = engine.optimizer
    lp_groups, hp_flats = _zero12_groups(opt)
    if any(k != "fp32" for k in keys):
        _create_adam_state(opt.optimizer, hp_flats)
    count = 0
    for params, flat in zip(lp_groups, hp_flats):
        state = opt.optimizer.state[flat]
        targets = {k: flat if k == "fp32" else state[k] for k in keys}
        for p in params:
            name = names.get(p)
            if name is None:  # fresh (`fresh`): keeps this run's initialisation
                continue
            mapping = getattr(p, "_hp_mapping", None)
            for key in keys:
                local = _local(tensor, name, key, layout[name], p.numel())
                if key == "fp32":
                    p.data.copy_(local.view_as(p))  # the whole working copy (every rank holds all of it)
                if mapping is not None:  # the fragment of it in this rank's fp32 range
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    targets[key].narrow(0, hp.start, hp.numel).copy_(local.reshape(-1).narrow(0, lp.start,
                                                                                             lp.numel))
            count += 1
    for p, name in names.items():  # frozen: the working copy only
        if not p.requires_grad:
            p.data.copy_(_local(tensor, name, "fp32", layout[name], p.numel()).view_as(p))
            count += 1
    return count


@torch.no_grad()
def _load_frozen_zero3(engine: Any, tensor: Any, layout: dict[str, dict[str, Any]],
                       names: dict[Any, str]) -> int:
    """ZeRO-3 frozen parameters: this DP rank's partition of each (between the checkpoint prologue, which
    partitions everything, and the epilogue, which re-gathers persistent parameters); returns the count."""
    opt, count = engine.optimizer, 0
    for p, name in names.items():
        if p.requires_grad:
            continue
        group = opt._get_param_partition_group(p)
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        piece = _dp_part(_local(tensor, name, "fp32", layout[name], p.ds_numel), rank, world)
        if piece.numel() != p.ds_tensor.ds_numel:
            raise RuntimeError(f"{name}: DP part of {piece.numel()} elements, ZeRO-3 holds "
                               f"{p.ds_tensor.ds_numel}")
        p.ds_tensor.data.copy_(piece.to(p.ds_tensor.dtype))
        count += 1
    return count


def load_full_tensors(engine: Any, tensor: Any, layout: dict[str, dict[str, Any]],
                      keys: tuple[str, ...] = KEYS, fresh: frozenset[str] = frozenset()) -> int:
    """Set `keys` of every parameter from `tensor(name, key)` (full single-device tensors); return count.

    `keys` = ("fp32",) loads weights only (imports): Adam moments keep their fresh zeros. Parameters named
    in `fresh` (a fusion encoder a dual-encoder source lacks) are left as they are."""
    names = _checked_names(engine, layout, fresh)
    opt = engine.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return _load_zero12(engine, tensor, layout, keys, names)
    opt.checkpoint_event_prologue()
    count = 0
    for sub, params in enumerate(opt.fp16_groups):
        fp32_flat = opt.fp32_partitioned_groups_flat[sub]
        bufs = {k: fp32_flat.clone() if k == "fp32" and fresh else torch.zeros_like(fp32_flat) for k in keys}
        offset = 0
        for p in params:
            name = names.get(p)
            if name is None:  # fresh: its part of the flat master keeps this run's initialisation
                offset += p.ds_tensor.ds_numel
                continue
            group = opt._get_param_partition_group(p)
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            for key in keys:
                piece = _dp_part(_local(tensor, name, key, layout[name], p.ds_numel), rank, world)
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
    count += _load_frozen_zero3(engine, tensor, layout, names)
    opt.checkpoint_event_epilogue()
    return count


def load_universal(engine: Any, src: Any) -> None:
    """Weights, Adam moments and step, the LR schedule's position and loss scale of universal source `src`
    into `engine`. The optimizer's hyper-parameters stay this run's (its parameter groups are never
    replaced; the scheduler keeps its base rates), whatever the checkpoint's config said."""
    meta = src.meta
    load_full_tensors(engine, src.tensor, meta["params"])
    opt = engine.optimizer
    step = torch.tensor(float(meta.get("optimizer_step") or meta["step"]))
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for fp32_flat in opt.fp32_partitioned_groups_flat:
            opt.optimizer.state[fp32_flat]["step"] = step.clone()
    else:  # ZeRO 1-2: keep the step's type (torch Adam: a tensor on its device; DeepSpeed's FusedAdam: int)
        for group in opt.optimizer.param_groups:
            for flat in group["params"]:
                st = opt.optimizer.state[flat]
                old = st.get("step")
                st["step"] = old.new_full((), float(step)) if torch.is_tensor(old) else int(step)
            if "step" in group:
                group["step"] = int(step)
    if meta.get("lr_scheduler") and engine.lr_scheduler is not None:
        # the saved position (last_epoch), this run's rates: optim.lr x each group's lr_mult (hparams.py)
        base_lrs = list(engine.lr_scheduler.base_lrs)
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        set_schedule(engine.lr_scheduler, base_lrs)
    for k, v in (meta.get("loss_scaler") or {}).items():
        if hasattr(opt, "loss_scaler") and hasattr(opt.loss_scaler, k):
            setattr(opt.loss_scaler, k, v)
    engine.global_steps = int(meta["step"])
    engine.global_samples = int(meta.get("global_samples") or 0)
    engine.skipped_steps = int(meta.get("skipped_steps") or 0)

