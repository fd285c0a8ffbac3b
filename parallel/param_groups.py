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


NO_DECAY_NAMES: tuple[str, ...] = (
    "logit_scale", "logit_bias",  # the contrastive temperature and SigLIP's bias
    "*class_embedding", "*mask_token",  # the image tower's CLS token, the MAE decoder's mask token
    "*positional_embedding",  # the image and text towers' positions
    "fusion.text_pos",  # `model.fusion.text_positions`: the fusion encoder's text positions
    "fusion.image_pos.embedding",  # `model.fusion.image_positions`: its image positions
)
"""Parameters exempt from weight decay by name (fnmatch, as `optim.lr_mult`), whatever their shape: every
learned token and position table of every tower, so that no table depends on its name happening to contain
"embedding" or "token" (`fusion.text_pos` once did not, and decayed)."""


def _exempt_from_decay(name: str, prm: torch.Tensor, embedding_table: bool = False) -> bool:
    """Biases, norms, embeddings (token, class and position tables, `NO_DECAY_NAMES`), tokens and the logit
    scale get no weight decay (CLIP). `embedding_table`: `prm` is the weight of an `nn.Embedding`, exempt
    whatever it is called (megatron's vocab-parallel table is no `nn.Embedding`: its name exempts it)."""
    return (prm.ndim < 2 or embedding_table or any(matches(name, pat) for pat in NO_DECAY_NAMES)
            or "embedding" in name or "logit_scale" in name or "token" in name or name.endswith(".bias"))


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, parameter, whether it is an `nn.Embedding`'s weight) for each trainable parameter, in
    `named_parameters` order."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [(n, p, id(p) in tables) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_mult: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over the trainable parameters of `model`.

    Without `lr_mult`: two groups, decay and no-decay, with no `lr` of their own (the optimizer's default
    applies), exactly as before multipliers existed. With it (and the base `lr`): one decay and one
    no-decay group per multiplier, the groups at multiplier 1 first (so `get_lr()[0]`, which the metrics
    log, stays the base rate when any parameter trains at it), empty groups dropped (ZeRO 1-2 flatten each
    group and an empty one has nothing to partition). Frozen parameters are in no group."""
    named = _named_trainable(model)
    if not lr_mult:
        decay, no_decay = [], []
        for name, prm, table in named:
            (no_decay if _exempt_from_decay(name, prm, table) else decay).append(prm)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is None:
        raise ValueError("param_groups: lr_mult needs the base lr")
    taken, unused = first_pattern([n for n, _, _ in named], list(lr_mult))
    if unused:
        raise ValueError(f"optim.lr_mult: pattern(s) {unused} match no trainable parameter not already "
                         "taken by an earlier pattern")
    mults = [1.0] + [m for m in dict.fromkeys(lr_mult.values()) if m != 1.0]
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {(m, d): [] for m in mults for d in (True, False)}
    for name, prm, table in named:
        mult = lr_mult[taken[name]] if name in taken else 1.0
        groups[(mult, not _exempt_from_decay(name, prm, table))].append(prm)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult,
             "lr_mult": mult} for (mult, decay), params in groups.items() if params]
