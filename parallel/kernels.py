"""Fused kernels that replace modules of a built model in place (apex FusedLayerNorm), and the checks
that say why one cannot run here. Applied by `pretrain/parallelize.py`; the model code never branches
on them."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn


def fused_layer_norm_problem() -> str | None:
    """Why apex's FusedLayerNorm cannot be used here (a sentence), or None when it can."""
    if importlib.util.find_spec("apex") is None:
        return "apex is not installed (NVIDIA apex is built from source; PyPI's `apex` is unrelated)"
    try:
        from apex.normalization import FusedLayerNorm  # noqa: F401
    except ImportError as e:  # apex installed without its CUDA extensions, or the unrelated PyPI apex
        return f"apex.normalization.FusedLayerNorm does not import ({e})"
    if not torch.cuda.is_available():
        return "apex FusedLayerNorm is a CUDA kernel and torch sees no CUDA device here"
    return None


@functools.cache
def _fused_layer_norm_cls() -> type[nn.Module]:
    problem = fused_layer_norm_problem()
    if problem is not None:
        raise ValueError(f"model.fused_layernorm=true: {problem}")
    from apex.normalization import FusedLayerNorm

    return FusedLayerNorm


def fuse_layer_norms(model: nn.Module) -> int:
    """Replace every affine 1-D nn.LayerNorm in `model` by apex FusedLayerNorm holding the SAME Parameter
    objects (names, shapes and values unchanged: checkpoints and optimizer groups stay valid). Returns
    how many were replaced; ValueError naming `model.fused_layernorm` when apex or CUDA is missing.
    Call before the model is wrapped by DeepSpeed (ZeRO-3 hooks the modules present then)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is not nn.LayerNorm or len(child.normalized_shape) != 1
                    or child.weight is None or child.bias is None):
                continue
            fused = _fused_layer_norm_cls()(child.normalized_shape[0], eps=child.eps)
            fused.weight, fused.bias = child.weight, child.bias
            setattr(parent, name, fused)
            replaced += 1
    return replaced


def fp8_problem() -> str | None:
    """Why fp8 training (torchao's Float8Linear) cannot run here (a sentence), or None when it can. Without
    CUDA it runs emulated: correct, slow, for tests."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (`pip install torchao`)"
    try:
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except ImportError as e:
        return f"torchao.float8 does not import ({e})"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return (f"fp8 matmuls need compute capability >= 8.9 (H100/H200, L40, RTX 40xx); this GPU is "
                f"{major}.{minor}")
    return None


def fp8_linears(blocks: list[nn.Module]) -> int:
    """Turn every nn.Linear inside `blocks` whose sizes are multiples of 16 (what fp8 tensor cores tile)
    into torchao's Float8Linear, in place: same Parameter objects and names, fp8 casts with dynamic
    per-tensor scales in forward and backward. Returns how many were converted. Call before DeepSpeed
    wraps the model."""
    from torchao.float8 import convert_to_float8_training

    def fits(mod: nn.Module, _fqn: str) -> bool:
        return type(mod) is nn.Linear and mod.in_features % 16 == 0 and mod.out_features % 16 == 0

    before = sum(1 for b in blocks for m in b.modules() if fits(m, ""))
    for block in blocks:
        convert_to_float8_training(block, module_filter_fn=fits)
    return before - sum(1 for b in blocks for m in b.modules() if fits(m, ""))
