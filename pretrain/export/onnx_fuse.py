"""Export-time graph shape for onnxruntime's fusions, the optional transformer optimizer, and op counts.

Why the towers are rewritten before tracing: the training `Attention` packs q, k and v per head
(`qkv` rows [heads, 3, head_dim]) and unbinds them, which the TorchScript exporter writes as a Split and
Squeeze chain over the whole QKV activation. No onnxruntime fusion matches that, and the Split is a full
copy (~5% of the int8 image tower at the demo's shapes). `fusable_tower` deep-copies a tower and swaps
each `Attention` for `FusableAttention`: the same weights as three projections and the textbook
reshape/transpose form. On CPU, onnxruntime's own session optimizer (ORT_ENABLE_ALL) then folds the k
transpose and the 1/sqrt(d) scale into one FusedMatMul per layer and, in int8, shares one
DynamicQuantizeLinear between the q, k and v MatMulIntegerToFloat; and `onnxruntime.transformers`'
optimizer recognises every layer (fused Attention, SkipLayerNormalization, BiasGelu; the text tower's
causal mask as a unidirectional Attention).

That optimizer is optional (`pretrain convert --to onnx --optimizer transformers`), not the default: on
this 2-core CPU at the demo's shapes its fused CPU kernels are slower than what the session optimizer
builds from the rewritten graph (Attention/QAttention and SkipLayerNormalization measured 0.6-0.9x; see
docs/benchmarks.md, "#18 fusion"). The fused graph is what GPU providers want.

Opset 17, not 18: the optimizer's symbolic shape inference cannot type opset 18's ReduceL2 (axes as an
input; the final L2 normalisation), and without shapes it fuses no SkipLayerNormalization and hence no
Attention.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.export.onnx_runtime import CPU_DISABLED_OPTIMIZERS
from pretrain.models.transformer import Attention

__all__ = ["OPTIMIZERS", "FusableAttention", "fusable_tower", "graph_record", "op_counts",
           "session_op_counts", "transformers_optimize"]

OPTIMIZERS = ("none", "transformers")
"""`--optimizer`: none (export + onnxruntime's session optimizer at load) or onnxruntime.transformers'."""
_MODEL_TYPE = {"image": "vit", "text": "clip"}
"""Which onnxruntime.transformers fusion set matches each tower: BERT/ViT's non-causal attention, CLIP
text's causal one."""


class FusableAttention(nn.Module):
    """`Attention` in eval mode, written the way onnxruntime's attention fusions expect it: separate q, k, v
    projections, q/v reshaped [B, T, H, D] and transposed to [B, H, T, D], k transposed straight to
    [B, H, D, T], scores scaled (Div for the bidirectional pattern; Mul then an additive -inf triangle for
    the causal one), softmax, @ v, back to [B, T, W], `proj`. Same weights, same function."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        width = attn.qkv.in_features
        heads, dim = attn.qkv.out_features // (3 * attn.head_dim), attn.head_dim
        self.heads, self.head_dim = heads, dim
        weight = attn.qkv.weight.detach().view(heads, 3, dim, width)
        bias = attn.qkv.bias.detach().view(heads, 3, dim)
        self.q, self.k, self.v = (nn.Linear(width, heads * dim) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(weight[:, i].reshape(heads * dim, width))
                lin.bias.copy_(bias[:, i].reshape(heads * dim))
        self.proj = attn.proj

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_padding_mask is not None:
            raise NotImplementedError("FusableAttention exports the causal text and the unmasked image "
                                      "pass only (no key padding mask)")
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k = self.k(x).view(B, T, H, D).permute(0, 2, 3, 1)
        v = self.v(x).view(B, T, H, D).transpose(1, 2)
        if causal:
            scores = (q @ k) * D ** -0.5
            i = torch.arange(T, device=x.device)
            tri = torch.where(i.unsqueeze(1) < i.unsqueeze(0), float("-inf"), 0.0)
            scores = scores + tri.unsqueeze(0).unsqueeze(0).expand(B, H, T, T)
        else:
            scores = (q @ k) / math.sqrt(D)
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        return self.proj(y)


def fusable_tower(tower: nn.Module) -> nn.Module:
    """A deep copy of `tower` (eval) with every `Attention` replaced by `FusableAttention`; module names
    are unchanged, so export errors still name the original layer."""
    out = copy.deepcopy(tower).eval()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, name, FusableAttention(child))
    return out


def op_counts(path: Path) -> dict[str, int]:
    """Node count per op type of the graph at `path` (contrib ops included), sorted by name."""
    import onnx

    return dict(sorted(Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()))


def session_op_counts(path: Path, disabled_optimizers: list[str]) -> dict[str, int]:
    """Op counts of the graph onnxruntime's CPU session actually runs (ORT_ENABLE_ALL, what `OnnxCLIP`
    uses): the fusions done at load time, which the file on disk does not show."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "session.onnx")
        opts.log_severity_level = 3  # the NCHWc "hardware specific" notice on saving is expected here
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_optimizers)
        return op_counts(Path(tmp) / "session.onnx")


def transformers_optimize(src: Path, dst: Path, tower: str, heads: int, width: int) -> dict[str, int]:
    """`onnxruntime.transformers.optimizer.optimize_model` on one tower (fusions only, opt_level 0: the
    session optimizer still runs at load); writes `dst`, returns its fused-operator statistics."""
    from onnxruntime.transformers.optimizer import optimize_model

    # its modules log under bare names (fusion_attention, onnx_model, ...): mute warnings globally while
    # it runs (the producer-name notice, shapes it re-infers), then restore the caller's setting
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model: Any = optimize_model(str(src), model_type=_MODEL_TYPE[tower], num_heads=heads,
                                    hidden_size=width, opt_level=0)
    finally:
        logging.disable(previous)
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def graph_record(paths: dict[str, Path], fused: dict[str, dict[str, int]] | None) -> dict[str, Any]:
    """The manifest's `graph`: how the towers were written, which optimizer ran (`fused`: its statistics
    per tower, None when it did not run), and the op counts of each file and of its CPU session graph."""
    return {"attention": "separate q/k/v projections (pretrain.export.onnx_fuse.FusableAttention)",
            "optimizer": "onnxruntime.transformers.optimizer.optimize_model (vit: image, clip: text)"
            if fused else None, "fused_operators": fused,
            "session": {"graph_optimization_level": "ORT_ENABLE_ALL",
                        "cpu_disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)},
            "ops": {t: op_counts(p) for t, p in paths.items()},
            "session_ops": {t: session_op_counts(p, list(CPU_DISABLED_OPTIMIZERS)) for t, p in paths.items()}}
