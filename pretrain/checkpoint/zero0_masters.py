"""The fp32 master weights of a ZeRO-0 bf16/fp16 checkpoint, by parameter name.

Under ZeRO 0 with bf16/fp16, the model-states file's `module` holds the half-precision working copy; the fp32
masters the optimizer updates sit in the same file under `optimizer` (DeepSpeed's FP16_UnfusedOptimizer:
`fp32_groups`, one tensor per parameter; FP16_Optimizer: `fp32_groups_flat`, one flat tensor per group), in
the order of the optimizer's parameter groups, with no names. ZeRO 1-3 exports read the masters, so a ZeRO-0
export must too, or the same run exported at different stages would differ (bf16 rounding, up to 2^-9).

The names come from the groups the engine was given: `parallel.param_groups.param_groups` over the
single-device model of the checkpoint's own config (meta device), after `train.freeze`. Tensor parallelism
keeps names and order, and every master's shape is checked against the working copy of that name, so a
mapping that does not fit is never used silently: it falls back to the working copy with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("mmpt.checkpoint")


def group_names(client: dict[str, Any]) -> list[list[str]]:
    """Parameter names of each optimizer group, in the order training gave them to DeepSpeed."""
    from parallel.param_groups import param_groups
    from pretrain.checkpoint.model_build import build_model
    from pretrain.config import config_from_dict
    from pretrain.freeze import apply_freeze

    cfg = config_from_dict(client["config"])
    model = build_model(cfg, client["tokenizer"], "meta", classnames=client.get("classnames"))
    apply_freeze(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_mult)
    return [[names[id(p)] for p in g["params"]] for g in groups]


def _split_flat(flat: list[torch.Tensor], names: list[list[str]], module: dict[str, torch.Tensor]
                ) -> list[list[torch.Tensor]]:
    """FP16_Optimizer's one flat fp32 tensor per group, cut back into its parameters (group order)."""
    out = []
    for tensor, group in zip(flat, names, strict=True):
        sizes = [module[n].numel() for n in group]
        if sum(sizes) != tensor.numel():
            raise ValueError(f"a flat fp32 group holds {tensor.numel()} values, its parameters {sum(sizes)}")
        out.append([t.view(module[n].shape) for t, n in zip(torch.split(tensor, sizes), group, strict=True)])
    return out


def fp32_masters(states: dict[str, Any], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """name -> fp32 master of each trainable parameter of a ZeRO-0 model-states dict; empty when there are
    none (an fp32 run, whose `module` is already fp32, or a checkpoint without mmpt's client state)."""
    opt = states.get("optimizer")
    client = states.get("mmpt")
    if not isinstance(opt, dict) or not isinstance(client, dict):
        return {}
    groups, flat = opt.get("fp32_groups"), opt.get("fp32_groups_flat")
    if groups is None and flat is None:
        return {}
    module = states["module"]
    try:
        names = group_names(client)
        if groups is None:
            groups = _split_flat(flat, names, module)
        if len(groups) != len(names):
            raise ValueError(f"{len(groups)} fp32 groups saved, the config gives {len(names)} groups")
        out: dict[str, torch.Tensor] = {}
        for tensors, group in zip(groups, names, strict=True):
            if len(tensors) != len(group):
                raise ValueError(f"a group of {len(tensors)} fp32 masters, the config names {len(group)}")
            for t, n in zip(tensors, group, strict=True):
                if n not in module or tuple(module[n].shape) != tuple(t.shape):
                    raise ValueError(f"master of shape {tuple(t.shape)} does not fit {n!r}")
                out[n] = t.float()
        return out
    except (ValueError, KeyError) as e:
        log.warning("%s: cannot name the ZeRO-0 fp32 master weights (%s); using the %s working copy",
                    where, e, next(iter(module.values())).dtype if module else "module's")
        return {}
