"""Pre-LN transformer shared by the image tower, the text tower and the MAE decoder.

Tensors are batch-first: [B, T, W]. Single-device code: plain nn.Linear / nn.LayerNorm. Tensor
parallelism, activation checkpointing, kernel choices and compilation are applied to the built model by
`pretrain/parallelize.py`; the only trace of them here is that attention reads its (local) head count
from the tensor shape and runs dropout on split activations inside `rng.tensor_parallel_rng()`.

Fused QKV layout. `Attention.qkv` is ONE linear with 3*W output features laid out as
[heads, 3, head_dim] (Megatron-LM's layout): rows h*3*D ... (h+1)*3*D - 1 hold head h's query, key
and value. A contiguous split of those rows over tensor-parallel ranks therefore hands every rank
whole heads with their q, k and v together. HF `CLIPModel` / open_clip / `nn.MultiheadAttention`
stack [3, heads, head_dim] (all queries, then keys, then values); exporters convert with
`fused_qkv_to_stacked` and importers with `stacked_to_fused_qkv`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel import rng

ATTENTION_IMPLS = ("sdpa", "math")
LAYER_NORM_EPS = 1e-5
"""Epsilon of every LayerNorm in the towers (OpenAI CLIP's); exporters read it from here."""


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


def fused_qkv_to_stacked(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads, 3, head_dim](, in) rows -> [3, heads, head_dim](, in) rows (weight or bias)."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def stacked_to_fused_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `fused_qkv_to_stacked`: [3, heads, head_dim] rows -> [heads, 3, head_dim] rows."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; needed to load/export its checkpoints exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected gelu or quick_gelu")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention, softmax(Q K^T / sqrt(d) + mask) V, with SDPA's signature and semantics:
    q, k, v [B, H, T, D]; `attn_mask` bool (True = attend) broadcastable to [B, H, T, T]; `is_causal`
    applies the lower triangle. The softmax runs in fp32 whatever the input dtype."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # [B, H, T, S]
    keep = attn_mask
    if is_causal:
        tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        keep = tri if keep is None else keep & tri
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 attention: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention: {attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        self.attention = attention  # kernel only: no parameters depend on it
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)  # out features: [heads, 3, head_dim]
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, W]; key_padding_mask [B, T] bool, True = padding (never attended to)."""
        B, T, _ = x.shape
        # H = the heads this rank computes: all of them, or heads / tp once qkv is column-parallel (its
        # [heads, 3, head_dim] rows split into whole heads), read from the shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # [B, T, H, 3, D]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, T, D]
        mask = None
        if key_padding_mask is not None:
            keep = ~key_padding_mask.bool()  # [B, T] True = attend
            # an all-padding row would softmax over nothing (NaN); let it attend everywhere instead
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            mask = keep[:, None, None, :]  # [B, 1, 1, T]
            if causal:  # SDPA takes either a mask or is_causal, so fold the triangle in
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        p = self.attn_dropout if self.training else 0.0
        # probabilities are per head: under TP each rank draws its own masks (parallel/rng.py)
        with rng.tensor_parallel_rng() if p > 0 else contextlib.nullcontext():
            fn = F.scaled_dot_product_attention if self.attention == "sdpa" else math_attention
            y = fn(q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, W]
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.ln_1 = layer_norm(width)
        self.attn = Attention(width, heads, dropout, attn_dropout)
        self.ln_2 = layer_norm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act, dropout)

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, dropout, attn_dropout)
                                       for _ in range(layers))
        self.grad_checkpointing = False  # recompute blocks in backward (training only)

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: works with kwargs-free calls, inputs without grad and ZeRO-3 hooks;
                # the context replays the per-TP-rank dropout stream in recomputation
                x = checkpoint(blk, x, causal, key_padding_mask, use_reentrant=False,
                               context_fn=rng.checkpoint_contexts)
            else:
                x = blk(x, causal, key_padding_mask)
        return x

    @torch.no_grad()
    def init_weights(self, style: str = "scaled") -> None:
        """"scaled": OpenAI CLIP's text-tower init: std W^-0.5 for QKV, (2W)^-0.5 for fc1, W^-0.5 (2L)^-0.5
        for the two projections that write into the residual stream; biases 0, norms identity.
        "pytorch": what OpenAI's and open_clip's ViT blocks get, nothing but the layers' own defaults
        (nn.MultiheadAttention: Xavier-uniform QKV, zero attention biases; nn.Linear's uniform MLP)."""
        if style == "pytorch":
            for blk in self.resblocks:
                for ln in (blk.ln_1, blk.ln_2):
                    nn.init.ones_(ln.weight)
                    nn.init.zeros_(ln.bias)
                nn.init.xavier_uniform_(blk.attn.qkv.weight)  # fused [3W, W], as MHA's in_proj_weight
                blk.attn.proj.reset_parameters()
                for bias in (blk.attn.qkv.bias, blk.attn.proj.bias):
                    nn.init.zeros_(bias)
                blk.mlp.fc1.reset_parameters()
                blk.mlp.fc2.reset_parameters()
            return
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.resblocks:
            for ln in (blk.ln_1, blk.ln_2):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
            for lin, std in ((blk.attn.qkv, attn_std), (blk.attn.proj, proj_std),
                             (blk.mlp.fc1, fc_std), (blk.mlp.fc2, proj_std)):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

