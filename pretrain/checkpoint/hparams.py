"""A resume takes its position from the checkpoint and its optimizer hyper-parameters from this run's config.

DeepSpeed's `load_checkpoint` restores the optimizer's parameter groups as saved (`lr`, `initial_lr`,
`weight_decay`, `betas`, `eps`) and the LR scheduler's `base_lrs`; the universal loader restores the
scheduler's state too. Left at that, `pretrain train ... optim.lr=X --resume latest` recorded X in
`config.yaml` and trained on at the checkpoint's rate, and at another layout the outcome depended on which
other keys changed. What users (and Megatron's `--override-opt_param-scheduler`) expect instead: the
checkpoint supplies the position (step, the scheduler's `last_epoch`, Adam moments), this run supplies the
hyper-parameters. So `snapshot` records each group's values as this run built them (before the load: its
`weight_decay` -- 0 for the exempt groups --, `betas`, `eps`, and `initial_lr` = optim.lr x the group's
lr_mult), and `reapply` puts them back after it, sets the scheduler's `base_lrs` to them and each group's
current rate to `base x schedule(last_epoch)` (this run's schedule: its lambdas are never saved).

With an unchanged config every value put back equals the loaded one bit for bit: LambdaLR computes a
group's rate as `base_lr * lmbda(last_epoch)`, the same product. `changed_keys` names the keys that differ
from the checkpoint's config, logged once per key on rank 0 when the resume has loaded.
"""

from __future__ import annotations

import copy
from typing import Any

from pretrain.config import Config

HYPER = ("weight_decay", "betas", "eps")
"""AdamW hyper-parameters of an optimizer group that this run's config sets (besides its learning rate)."""
CONFIG_KEYS = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.warmup_steps",
               "optim.schedule", "optim.min_lr_ratio", "train.steps")
"""The config keys a resume takes from this run rather than from the checkpoint (the last four shape the
schedule; `train.steps` is where the cosine ends)."""


def changed_keys(saved: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for each CONFIG_KEYS entry that differs."""
    out = []
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        was, now = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if was != now:
            out.append((key, was, now))
    return out


def _group_lists(engine: Any) -> list[list[dict[str, Any]]]:
    """Every list of parameter groups DeepSpeed reads: first the optimizer the LR scheduler drives
    (DeepSpeed's basic optimizer, the one its ZeRO 1-3 / bf16 / fp16 wrappers step), then the wrapper's
    (`engine.get_lr` reads it) when it is a list of its own rather than the inner one handed through."""
    lists: list[list[dict[str, Any]]] = []
    scheduler, optimizer = getattr(engine, "lr_scheduler", None), getattr(engine, "optimizer", None)
    for opt in (getattr(scheduler, "optimizer", None), getattr(optimizer, "optimizer", None), optimizer):
        groups = getattr(opt, "param_groups", None)
        if groups is not None and all(groups is not seen for seen in lists):
            lists.append(groups)
    return lists


def snapshot(engine: Any) -> list[dict[str, Any]]:
    """This run's hyper-parameters of each optimizer group (HYPER and `initial_lr`), before a load ([] for
    an engine without an optimizer: nothing to put back)."""
    lists = _group_lists(engine)
    out = [{k: copy.copy(g[k]) for k in HYPER if k in g} for g in (lists[0] if lists else [])]
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None:
        for entry, base in zip(out, scheduler.base_lrs, strict=True):
            entry["initial_lr"] = base
    return out


def set_schedule(scheduler: Any, base_lrs: list[float]) -> None:
    """Give a LambdaLR at its restored position (`last_epoch`) these base rates and set each group's
    current rate from its schedule, as `scheduler.step()` would have."""
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, fn, base in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


def reapply(engine: Any, saved: list[dict[str, Any]]) -> None:
    """Put `snapshot`'s values back into every group list DeepSpeed reads, then the schedule's rates."""
    lists = _group_lists(engine)
    if not lists and not saved:
        return
    for groups in lists:
        if len(groups) != len(saved):
            raise RuntimeError(f"the optimizer has {len(groups)} parameter groups after loading the "
                               f"checkpoint and had {len(saved)} before")
        for group, values in zip(groups, saved):
            group.update({k: copy.copy(v) for k, v in values.items()})
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None:
        set_schedule(scheduler, [v["initial_lr"] for v in saved])
        for groups in lists[1:]:
            for group, rate in zip(groups, scheduler.get_last_lr()):
                group["lr"] = rate
