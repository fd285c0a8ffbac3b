"""Layer factory: every layer whose weights split under tensor parallelism is built here.

With tp == 1 these are plain `nn.Linear` / `nn.Embedding` (parameter names and state dicts identical to a
single-device model). With tp > 1 they are megatron-core's `ColumnParallelLinear`, `RowParallelLinear` and
`VocabParallelEmbedding`, wrapped only so that `forward` returns a tensor and the state-dict keys stay
the same. The model files never branch on the parallel layout; this is the only model file that knows
megatron-core exists.

Identical initial weights for every layout (the same seed gives the same FULL model at tp=1 and tp=2):
the random stream is consumed exactly as the single-device model consumes it, and each rank keeps its
slice. Concretely, a parallel layer is cut from the full `nn.Linear`/`nn.Embedding` the single-device
model would have constructed (same draws at construction), and `init_normal_` -- which the models'
`init_weights` use for split weights -- draws the full-size tensor and keeps this rank's slice. Every
rank therefore runs the same draws in the same order, and replicated parameters, dropout on replicated
activations and everything after initialisation stay in lock-step. The cost is one transient full-size
copy of the layer being built (megatron's own `use_cpu_initialization` does the same).

Parameters that split under TP carry `tp_partition_dim` at every tp (also tp == 1 and on the meta
device), so `pretrain plan` can count per-rank sizes without building the parallel model; with tp > 1
they also carry megatron's `tensor_model_parallel` / `partition_dim` that DeepSpeed reads so gradient
norms count shards once and replicated parameters once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
from torch import nn

from parallel import rng
from parallel.groups import model_parallel_initialized, tp_rank, tp_size

PARTITION_ATTR = "tp_partition_dim"


# ------------------------------------------------------------------------------------ helpers
def _tag(param: nn.Parameter, dim: int) -> None:
    setattr(param, PARTITION_ATTR, dim)


def partition_dim(param: torch.Tensor) -> int | None:
    """Dimension along which `param` is split over TP ranks, None when it is replicated."""
    return getattr(param, PARTITION_ATTR, None)


def heads_per_rank(heads: int) -> int:
    """Attention heads this rank computes: all of them without TP, heads / tp with it."""
    if heads % tp_size():
        raise ValueError(f"parallel.tp ({tp_size()}) must divide the number of attention heads ({heads})")
    return heads // tp_size()


def _shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    return full.chunk(tp_size(), dim=dim)[tp_rank()]


@torch.no_grad()
def _copy_from_full(dst: nn.Parameter, full: torch.Tensor, dim: int | None) -> None:
    dst.copy_(full if dim is None else _shard(full, dim))


@torch.no_grad()
def init_normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
    """`nn.init.normal_` that gives the same full tensor for every TP layout: a split parameter draws its
    full shape from the default generator (as the single-device model does) and keeps its slice."""
    dim = partition_dim(param)
    if dim is None or tp_size() == 1:
        return nn.init.normal_(param, mean=mean, std=std)
    shape = list(param.shape)
    shape[dim] *= tp_size()
    full = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(mean, std)
    param.copy_(_shard(full, dim))
    return param


@functools.cache
def _mp_config(tp: int):
    """megatron-core's layer config: CPU allocation (DeepSpeed moves modules to the device) and no
    initialisation of its own: weights come from the full single-device layer (see module docstring)."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    if not model_parallel_initialized():
        raise RuntimeError(f"tensor-parallel layers (tp={tp}) need the process groups: call "
                           "parallel.groups.init_distributed(tp=...) before building the model")
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
def _parallel_classes() -> dict[str, type[nn.Module]]:
    """Subclasses of megatron's layers that return a tensor (not (output, bias)) and keep state-dict keys
    equal to nn.Linear's (no `_extra_state` entry)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    class Column(ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class VocabEmbedding(VocabParallelEmbedding):
        pass

    return {"column": Column, "row": Row, "vocab": VocabEmbedding}


# ------------------------------------------------------------------------------------- linears
def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Linear whose OUTPUT features are split over tensor-parallel ranks (QKV, MLP fc1, MLM decoder);
    its output stays split (no gather), ready for a row linear or a vocabulary-parallel loss."""
    full = nn.Linear(in_features, out_features, bias=bias)
    _tag(full.weight, 0)
    if bias:
        _tag(full.bias, 0)
    if tp_size() == 1:
        return full
    layer = _parallel_classes()["column"](in_features, out_features, config=_mp_config(tp_size()),
                                          init_method=_no_init, bias=bias, gather_output=False)
    _mark_parallel(layer.weight, 0)
    _copy_from_full(layer.weight, full.weight, 0)
    _tag(layer.weight, 0)
    if bias:
        _copy_from_full(layer.bias, full.bias, 0)
        _tag(layer.bias, 0)
    return layer


def row_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Linear whose INPUT features are split over tensor-parallel ranks (attention out, MLP fc2);
    its output is summed over ranks, so it follows a column linear without a gather in between.
    The bias is replicated (added once, after the sum)."""
    full = nn.Linear(in_features, out_features, bias=bias)
    _tag(full.weight, 1)
    if tp_size() == 1:
        return full
    layer = _parallel_classes()["row"](in_features, out_features, config=_mp_config(tp_size()),
                                       init_method=_no_init, bias=bias, input_is_parallel=True,
                                       skip_bias_add=False)
    _mark_parallel(layer.weight, 1)
    _copy_from_full(layer.weight, full.weight, 1)
    _tag(layer.weight, 1)
    if bias:
        _copy_from_full(layer.bias, full.bias, None)
    return layer


def vocab_linear(in_features: int, vocab_size: int) -> nn.Module:
    """Output projection onto the (padded) vocabulary; with tp > 1 each rank computes the logits of its
    vocabulary slice, to be consumed by `cross_entropy_sum`."""
    return column_linear(in_features, vocab_size, bias=True)


def vocab_embedding(vocab_size: int, dim: int) -> nn.Module:
    """Token embedding; with tp > 1 each rank holds a contiguous slice of the (padded) vocabulary and the
    lookups are summed over ranks (megatron's VocabParallelEmbedding)."""
    full = nn.Embedding(vocab_size, dim)
    _tag(full.weight, 0)
    if tp_size() == 1:
        return full
    if vocab_size % tp_size():
        raise ValueError(f"padded vocabulary ({vocab_size}) is not divisible by parallel.tp ({tp_size()})")
    layer = _parallel_classes()["vocab"](vocab_size, dim, init_method=_no_init, config=_mp_config(tp_size()))
    _mark_parallel(layer.weight, 0)
    _copy_from_full(layer.weight, full.weight, 0)
    _tag(layer.weight, 0)
    return layer


# ---------------------------------------------------------------------------------------- dropout
def tensor_parallel_rng(active: bool = True) -> contextlib.AbstractContextManager:
    """Context for dropout on activations that are split over TP ranks (this rank's heads): a per-rank
    random stream (megatron's RNG tracker on CUDA). A no-op without TP or when `active` is False (no
    dropout to draw, so no generator swap)."""
    return rng.tensor_parallel_rng() if active else contextlib.nullcontext()


def checkpoint_rng_contexts():
    """`context_fn` for torch.utils.checkpoint so recomputation replays the per-rank dropout stream."""
    return rng.checkpoint_contexts()


# ------------------------------------------------------------------------------------------ norms
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
def _fused_layer_norm_cls() -> type[nn.Module] | None:
    if fused_layer_norm_problem() is not None:
        return None
    from apex.normalization import FusedLayerNorm

    return FusedLayerNorm


def layer_norm(dim: int, eps: float = 1e-5, fused: bool = False) -> nn.Module:
    """nn.LayerNorm, or with `fused` apex's FusedLayerNorm (same `weight`/`bias` names and shapes;
    ValueError when apex or CUDA is missing: see `model.fused_layernorm`)."""
    if not fused:
        return nn.LayerNorm(dim, eps=eps)
    cls = _fused_layer_norm_cls()
    if cls is None:
        raise ValueError(f"model.fused_layernorm=true: {fused_layer_norm_problem()}")
    return cls(dim, eps=eps)


def fuse_layer_norms(model: nn.Module) -> int:
    """Replace every nn.LayerNorm in `model` by apex FusedLayerNorm holding the SAME Parameter objects
    (names, shapes and values unchanged: checkpoints and optimizer groups stay valid). Returns how many
    were replaced. Call before the model is wrapped by DeepSpeed."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is not nn.LayerNorm or len(child.normalized_shape) != 1
                    or child.weight is None or child.bias is None):  # ours are all affine, 1-D
                continue
            fused = layer_norm(child.normalized_shape[0], eps=child.eps, fused=True)
            fused.weight, fused.bias = child.weight, child.bias
            setattr(parent, name, fused)
            replaced += 1
    return replaced
