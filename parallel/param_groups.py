"""Optimizer parameter groups: CLIP's weight-decay split, per-pattern learning-rate multipliers
(`optim.lr_mult`), and frozen parameters (`requires_grad=False`, `train.freeze`) left out.

Patterns are fnmatch patterns (`*` also crosses dots) matched against the names of the single-device
model. Tensor parallelism keeps those names (`pretrain/parallelize.py` swaps layers under the same
attribute names), so the same pattern selects the same parameters at every `parallel.tp`, and the groups
are built before DeepSpeed wraps the model, so ZeRO's renaming never enters.

A multiplier is carried as the group's own `lr` (optim.lr x multiplier, its `initial_lr` for the LR
scheduler): torch's `LambdaLR` multiplies every group's initial lr by the same warm-up + cosine factor,
so each group keeps its ratio to the base rate at every step, and ZeRO 1-3 keep each group's
hyper-parameters on their flat fp32 partitions. The multiplier itself rides in the group as `lr_mult`
(saved with the optimizer state, so a checkpoint says which group had which).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def matches(name: str, pattern: str) -> bool:
    """Whether parameter `name` matches `pattern` (fnmatch, case-sensitive: names are code)."""
    return fnmatch.fnmatchcase(name, pattern)


def match_patterns(names: Iterable[str], patterns: Sequence[str]) -> dict[str, list[str]]:
    """pattern -> every name it matches, in name order (an empty list: it matches nothing)."""
    names = list(names)
    return {pat: [n for n in names if matches(n, pat)] for pat in patterns}


def first_pattern(names: Iterable[str], patterns: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(name -> the first pattern, in written order, that matches it; the patterns that took no name).

    First-match is what a reader of `{text.*: 0.1, text.token_embedding.*: 0.01}` could misread, so a
    pattern left with nothing (never matching, or shadowed by an earlier one) is reported, not ignored."""
    taken: dict[str, str] = {}
    for name in names:
        for pat in patterns:
            if matches(name, pat):
                taken[name] = pat
                break
    used = set(taken.values())
    return taken, [p for p in patterns if p not in used]


def _exempt_from_decay(name: str, prm: torch.Tensor) -> bool:
    """Biases, norms, embeddings, tokens and the logit scale get no weight decay (CLIP)."""
    return (prm.ndim < 2 or "embedding" in name or "logit_scale" in name or "token" in name
            or name.endswith(".bias"))


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_mult: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over the trainable parameters of `model`.

    Without `lr_mult`: two groups, decay and no-decay, with no `lr` of their own (the optimizer's default
    applies), exactly as before multipliers existed. With it (and the base `lr`): one decay and one
    no-decay group per multiplier, the groups at multiplier 1 first (so `get_lr()[0]`, which the metrics
    log, stays the base rate when any parameter trains at it), empty groups dropped (ZeRO 1-2 flatten each
    group and an empty one has nothing to partition). Frozen parameters are in no group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not lr_mult:
        decay, no_decay = [], []
        for name, prm in named:
            (no_decay if _exempt_from_decay(name, prm) else decay).append(prm)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is None:
        raise ValueError("param_groups: lr_mult needs the base lr")
    taken, unused = first_pattern([n for n, _ in named], list(lr_mult))
    if unused:
        raise ValueError(f"optim.lr_mult: pattern(s) {unused} match no trainable parameter not already "
                         "taken by an earlier pattern")
    mults = [1.0] + [m for m in dict.fromkeys(lr_mult.values()) if m != 1.0]
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {(m, d): [] for m in mults for d in (True, False)}
    for name, prm in named:
        mult = lr_mult[taken[name]] if name in taken else 1.0
        groups[(mult, not _exempt_from_decay(name, prm))].append(prm)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult,
             "lr_mult": mult} for (mult, decay), params in groups.items() if params]
