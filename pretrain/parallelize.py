"""Prepare a built model for training, in one readable step (torchtitan's `parallelize`).

The model is built and initialised as single-device code (`PretrainModel.from_config`). Then, in order:

1. tensor parallelism: the layers `TP_PLAN` names become megatron-core column / row / vocabulary-
   parallel layers holding this rank's slice of the full weights (`parallel/tensor_parallel.py`), so
   every layout starts from the same full model;
2. activation checkpointing of every transformer block (`train.activation_checkpointing`);
3. kernels: the attention implementation (`model.attention`) and apex FusedLayerNorm
   (`model.fused_layernorm`, `parallel/kernels.py`);
4. fp8 matmuls in every transformer block's linear layers (`train.fp8`, torchao's Float8Linear), then
   torch.compile of every transformer block (`train.compile`; with `train.compile_scope=model` the
   whole forward is compiled instead, by DeepSpeed's `engine.compile()` once the engine wraps the model);
5. `train.freeze`: the parameters it names stop requiring gradients (`pretrain/freeze.py`; after the
   swaps above, whose new parameters start trainable), and `optim.lr_mult`'s patterns are checked.

Call it after the process groups exist and before DeepSpeed wraps the model (ZeRO-3 hooks the modules
present then). Nothing here changes parameter names, so checkpoints look the same at every layout.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from parallel import kernels
from parallel.groups import tp_size
from parallel.tensor_parallel import parallel_version, split_dims
from pretrain.config import Config, check_runtime
from pretrain.freeze import apply_freeze, frozen_names
from pretrain.models.fusion import CrossAttention, FusionEncoder
from pretrain.models.heads import MLMHead
from pretrain.models.text import TextTower
from pretrain.models.transformer import ATTENTION_IMPLS, MLP, Attention, Transformer

TP_PLAN: dict[type[nn.Module], dict[str, str]] = {
    Attention: {"qkv": "column", "proj": "row"},  # qkv rows [heads, 3, head_dim]: whole heads per rank
    MLP: {"fc1": "column", "fc2": "row"},
    TextTower: {"token_embedding": "vocab"},
    MLMHead: {"decoder": "column"},  # logits stay split: the MLM loss is vocabulary-parallel
    # fusion blocks: their self-attention and MLP are the towers' classes above; the cross-attention's q
    # rows are [heads, head_dim] and kv rows [heads, 2, head_dim], so column splits hand out whole heads
    CrossAttention: {"q": "column", "kv": "column", "proj": "row"},
}
"""Which child layer of which module splits, and how (see `parallel.tensor_parallel.STYLES`). Every
other parameter is replicated on the tensor-parallel ranks."""


def _planned_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(qualified child name, parent module, child attribute, style) for every layer the plan splits."""
    out = []
    for name, mod in model.named_modules():
        for child, style in TP_PLAN.get(type(mod), {}).items():
            out.append((f"{name}.{child}" if name else child, mod, child, style))
    return out


def tp_split_dims(model: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dimension it is split along under tensor parallelism (None: replicated),
    for every parameter of `model`, at any tp and before or after `parallelize` (also on the meta
    device). `pretrain plan` counts per-rank sizes and checkpoints record split metadata with it."""
    dims: dict[str, int | None] = {n: None for n, _ in model.named_parameters()}
    for qualified, parent, child, style in _planned_layers(model):
        layer = getattr(parent, child)
        for pname, dim in split_dims(style, getattr(layer, "bias", None) is not None).items():
            if f"{qualified}.{pname}" in dims:
                dims[f"{qualified}.{pname}"] = dim
    return dims


def apply_tensor_parallel(model: nn.Module) -> int:
    """Swap every planned layer for its tensor-parallel version at the current tp; returns how many were
    swapped (0 at tp = 1, where the model is left as built)."""
    if tp_size() == 1:
        return 0
    planned = _planned_layers(model)
    for _, parent, child, style in planned:
        setattr(parent, child, parallel_version(style, getattr(parent, child)))
    return len(planned)


def set_attention(model: nn.Module, attention: str) -> None:
    """Every `Attention` runs `attention` (sdpa or math); no parameter depends on it."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention: {attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    for mod in model.modules():
        if isinstance(mod, (Attention, CrossAttention)):
            mod.attention = attention


def set_activation_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Recompute every transformer block in backward (towers, decoder and fusion encoder)."""
    for mod in model.modules():
        if isinstance(mod, (Transformer, FusionEncoder)):
            mod.grad_checkpointing = enable


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every residual block of every tower, the MAE decoder and the fusion encoder."""
    return [blk for mod in model.modules() if isinstance(mod, (Transformer, FusionEncoder))
            for blk in mod.resblocks]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> None:
    """torch.compile every transformer block in place (`nn.Module.compile`): parameter names, state-dict
    keys and module hooks (ZeRO-3's gathers run eagerly, as graph breaks) are unchanged."""
    for blk in transformer_blocks(model):
        blk.compile(**compile_kwargs)


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, kernels and compilation to `model` in place
    (see the module docstring) and return it. First, one ConfigError naming every switch that asks for a
    kernel this machine cannot run (`optim.impl`, `model.fused_layernorm`, `train.fp8`), before DeepSpeed
    starts."""
    check_runtime(cfg)
    frozen_names(model, cfg)  # bad `train.freeze` patterns fail before any layer is swapped
    apply_tensor_parallel(model)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    set_attention(model, cfg.model.attention)
    if cfg.model.fused_layernorm:
        kernels.fuse_layer_norms(model)
    if cfg.train.fp8:
        kernels.fp8_linears(transformer_blocks(model))
    if cfg.train.compile and cfg.train.compile_scope == "blocks":  # `model`: parallel.engine.build_engine
        compile_blocks(model)
    apply_freeze(model, cfg)  # last: layers swapped above start trainable
    return model
