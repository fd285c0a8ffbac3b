"""Tensor-parallel versions of built layers: megatron-core's column, row and vocabulary-parallel layers,
cut from the full single-device module.

The model is always built and initialised as the single-device model; `pretrain/parallelize.py` then
swaps the layers its plan names for the ones made here. Each rank keeps its slice of the full weight, so
the same seed gives the same FULL model at every tensor-parallel degree, with no per-layer RNG care in
the model code. The wrappers return a tensor from `forward` (megatron returns (output, bias)) and keep
nn.Linear's state-dict keys (no `_extra_state`), so checkpoints and exports see the same names at
every layout. The split parameters carry megatron's `tensor_model_parallel` / `partition_dim`, which
DeepSpeed reads so gradient norms count each shard once and replicated parameters once.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from parallel.groups import model_parallel_initialized, tp_rank, tp_size

STYLES = ("column", "row", "vocab")
"""column: output features split (output stays split); row: input features split, output summed over
ranks (bias replicated); vocab: embedding rows split, lookups summed over ranks."""


def shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of `full` along `dim`."""
    return full.chunk(tp_size(), dim=dim)[tp_rank()]


@functools.cache
def _mp_config(tp: int):
    """megatron-core's layer config: CPU allocation (DeepSpeed moves modules to the device) and no
    initialisation of its own (weights come from the full layer)."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    if not model_parallel_initialized():
        raise RuntimeError(f"tensor-parallel layers (tp={tp}) need the process groups: call "
                           "parallel.groups.init_distributed(tp=...) before parallelizing the model")
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32)


def _no_init(_: torch.Tensor) -> None:
    """megatron's init_method; never called with perform_initialization=False."""


def _mark_parallel(param: nn.Parameter, dim: int) -> None:
    """megatron's TP attributes (its CPU path sets them only when it initialises weights itself)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if not getattr(param, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


@functools.cache
def _classes() -> dict[str, type[nn.Module]]:
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    class Column(ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if x.device.type == "cpu":  # megatron's advice to set CUDA_DEVICE_MAX_CONNECTIONS=1 (once per
                with warnings.catch_warnings():  # rank) has nothing to act on without CUDA: dropped there
                    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
                    return super().forward(x)[0]
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class VocabEmbedding(VocabParallelEmbedding):
        pass

    return {"column": Column, "row": Row, "vocab": VocabEmbedding}


@torch.no_grad()
def column_parallel(full: nn.Linear) -> nn.Module:
    """`full` with its OUTPUT features split over the TP ranks; the output stays split (no gather), ready
    for a row-parallel layer or a vocabulary-parallel loss."""
    bias = full.bias is not None
    layer = _classes()["column"](full.in_features, full.out_features, config=_mp_config(tp_size()),
                                 init_method=_no_init, bias=bias, gather_output=False)
    _mark_parallel(layer.weight, 0)
    layer.weight.copy_(shard(full.weight, 0))
    if bias:
        layer.bias.copy_(shard(full.bias, 0))
    return layer


@torch.no_grad()
def row_parallel(full: nn.Linear) -> nn.Module:
    """`full` with its INPUT features split over the TP ranks; the output is summed over ranks, so it
    follows a column-parallel layer without a gather in between. The bias is replicated."""
    bias = full.bias is not None
    layer = _classes()["row"](full.in_features, full.out_features, config=_mp_config(tp_size()),
                              init_method=_no_init, bias=bias, input_is_parallel=True, skip_bias_add=False)
    _mark_parallel(layer.weight, 1)
    layer.weight.copy_(shard(full.weight, 1))
    if bias:
        layer.bias.copy_(full.bias)
    return layer


@torch.no_grad()
def vocab_parallel(full: nn.Embedding) -> nn.Module:
    """`full` with its vocabulary rows split over the TP ranks (megatron's VocabParallelEmbedding)."""
    if full.num_embeddings % tp_size():
        raise ValueError(f"padded vocabulary ({full.num_embeddings}) is not divisible by parallel.tp "
                         f"({tp_size()})")
    layer = _classes()["vocab"](full.num_embeddings, full.embedding_dim, init_method=_no_init,
                                config=_mp_config(tp_size()))
    _mark_parallel(layer.weight, 0)
    layer.weight.copy_(shard(full.weight, 0))
    return layer


def parallel_version(style: str, full: nn.Module) -> nn.Module:
    """The tensor-parallel layer of `style` (see STYLES) cut from `full`."""
    if style == "column":
        return column_parallel(full)  # type: ignore[arg-type]
    if style == "row":
        return row_parallel(full)  # type: ignore[arg-type]
    if style == "vocab":
        return vocab_parallel(full)  # type: ignore[arg-type]
    raise ValueError(f"unknown tensor-parallel style {style!r}; expected one of {', '.join(STYLES)}")


def split_dims(style: str, has_bias: bool) -> dict[str, int | None]:
    """Per-parameter split dimension of a layer of `style`: {"weight": d, "bias": d or None}."""
    dims: dict[str, int | None] = {"weight": {"column": 0, "row": 1, "vocab": 0}[style]}
    if has_bias:
        dims["bias"] = 0 if style == "column" else None
    return dims
