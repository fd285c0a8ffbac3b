"""Layer factory: every linear layer of attention and MLP blocks is built here.

Tensor parallelism swaps these for megatron-core's ColumnParallelLinear / RowParallelLinear in one
place, so the model files never branch on the parallel layout. With tp == 1 they are plain
`nn.Linear`, which keeps parameter names and state dicts identical to a single-device model.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from parallel.groups import tp_size


def _require_no_tp(kind: str) -> None:
    if tp_size() > 1:
        raise NotImplementedError(f"tensor parallelism arrives with megatron-core layers ({kind}, "
                                  f"tp={tp_size()})")


def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Linear whose OUTPUT features are split over tensor-parallel ranks (QKV, MLP fc1)."""
    _require_no_tp("column_linear")
    return nn.Linear(in_features, out_features, bias=bias)


def row_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Linear whose INPUT features are split over tensor-parallel ranks (attention out, MLP fc2);
    its output is summed over ranks, so it follows a column linear without a gather in between."""
    _require_no_tp("row_linear")
    return nn.Linear(in_features, out_features, bias=bias)


@functools.cache
def _fused_layer_norm_cls() -> type[nn.Module] | None:
    if importlib.util.find_spec("apex") is None or not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:  # apex installed without its CUDA extensions
        return None
    return FusedLayerNorm


def layer_norm(dim: int, eps: float = 1e-5) -> nn.Module:
    """apex FusedLayerNorm on CUDA when available (same `weight`/`bias` names), else nn.LayerNorm."""
    cls = _fused_layer_norm_cls()
    return cls(dim, eps=eps) if cls is not None else nn.LayerNorm(dim, eps=eps)
