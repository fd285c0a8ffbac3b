"""`train.freeze` and `optim.lr_mult` on a built model: which parameters they select, checked at model build
time (the patterns need the model's names, so `pretrain.config.validate` cannot check them).

Both are fnmatch patterns over the names of the single-device model (`PretrainModel.named_parameters()`:
`visual.transformer.resblocks.0.attn.qkv.weight`, `text.token_embedding.weight`, `logit_scale`, ...).
Tensor parallelism swaps layers under the same names, so the same patterns select the same parameters at
every tp. A pattern that selects nothing is a ConfigError naming the key, the pattern and a few real
names: a typo in a LiT recipe must not silently train the tower it meant to lock.
"""

from __future__ import annotations

from torch import nn

from parallel.param_groups import first_pattern, match_patterns
from pretrain.config import Config, ConfigError

EXAMPLES = 6
"""How many real parameter names an error lists."""


def _examples(names: list[str]) -> str:
    """A few names from different parts of the model (first of each top-level module, then the rest)."""
    firsts = list(dict.fromkeys(n.split(".")[0] for n in names))
    picked = [next(n for n in names if n.split(".")[0] == top) for top in firsts]
    picked += [n for n in names if n not in picked]
    return ", ".join(picked[:EXAMPLES])


def frozen_names(model: nn.Module, cfg: Config) -> list[str]:
    """Names of the parameters `train.freeze` selects; ConfigError for a pattern that selects none, or if
    every parameter would be frozen (DeepSpeed needs something to optimize)."""
    names = [n for n, _ in model.named_parameters()]
    hits = match_patterns(names, cfg.train.freeze)
    for pattern, matched in hits.items():
        if not matched:
            raise ConfigError(f"train.freeze: pattern {pattern!r} matches no parameter of the model; "
                              f"names look like: {_examples(names)} (fnmatch: `visual.*` locks the image "
                              f"tower)")
    frozen = [n for n in names if any(n in m for m in hits.values())]
    if frozen and len(frozen) == len(names):
        raise ConfigError(f"train.freeze: {cfg.train.freeze} freezes every parameter; nothing would train")
    return frozen


def check_lr_mult(model: nn.Module, cfg: Config, frozen: list[str]) -> None:
    """ConfigError for an `optim.lr_mult` pattern that takes no trainable parameter: matching nothing,
    only frozen ones, or only ones an earlier pattern took (the first matching pattern wins)."""
    if not cfg.optim.lr_mult:
        return
    names = [n for n, _ in model.named_parameters()]
    skip = set(frozen)
    trainable = [n for n in names if n not in skip]
    _, unused = first_pattern(trainable, list(cfg.optim.lr_mult))
    for pattern in unused:
        anything = match_patterns(names, [pattern])[pattern]
        order = list(cfg.optim.lr_mult)
        earlier = order[:order.index(pattern)]
        if not anything:
            why = f"matches no parameter of the model; names look like: {_examples(names)}"
        elif all(n in skip for n in anything):
            why = "matches only parameters that train.freeze freezes"
        else:
            why = (f"matches only parameters an earlier pattern ({', '.join(map(repr, earlier))}) already "
                   "sets (the first matching pattern wins: put the more specific one first)")
        raise ConfigError(f"optim.lr_mult: pattern {pattern!r} {why}")


def apply_freeze(model: nn.Module, cfg: Config) -> list[str]:
    """Check `train.freeze` and `optim.lr_mult` against `model` and set requires_grad=False on the frozen
    parameters; returns their names. Call it on the model as it will be trained (after the tensor-parallel
    swap, whose new parameters start trainable) and before DeepSpeed builds its optimizer groups."""
    frozen = frozen_names(model, cfg)
    check_lr_mult(model, cfg, frozen)
    skip = set(frozen)
    for name, prm in model.named_parameters():
        if name in skip:
            prm.requires_grad_(False)
    return frozen
