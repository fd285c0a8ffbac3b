"""Cross-modal fusion encoder (ALBEF / BLIP): text-side blocks that also attend to the image tokens.

Each block is the towers' pre-LN block (`transformer.Attention`, `transformer.MLP`, the same
`layer_norm`) with one cross-attention sub-layer between self-attention and MLP:

    x = x + SelfAttn(LN(x))            bidirectional over the caption, padding keys masked
    x = x + CrossAttn(LN(x), image)    queries from the text, keys/values from the image tokens
    x = x + MLP(LN(x))

Single-device code; `pretrain/parallelize.py` splits it under tensor parallelism like the towers:
the self-attention and MLP are the towers' own classes (already in `TP_PLAN`), and `CrossAttention`
is planned as q/kv column-parallel, proj row-parallel. `CrossAttention.kv` is laid out as
[heads, 2, head_dim] rows (as `Attention.qkv` is [heads, 3, head_dim]) so a contiguous split of its
rows hands every rank whole heads with their key and value together; the head count is read from
the tensor shape, so the same code runs a rank's share of the heads.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel import rng
from pretrain.models.transformer import ATTENTION_IMPLS, MLP, Attention, layer_norm, math_attention


class CrossAttention(nn.Module):
    """Queries from `x` [B, T, W], keys and values from `ctx` [B, S, W_ctx] (every context token attended)."""

    def __init__(self, width: int, heads: int, ctx_width: int, dropout: float = 0.0,
                 attn_dropout: float = 0.0, attention: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention: {attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        self.attention = attention  # kernel only: set by `parallelize.set_attention`
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)  # out features: [heads, head_dim]
        self.kv = nn.Linear(ctx_width, 2 * width)  # out features: [heads, 2, head_dim]
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        S = ctx.shape[1]
        # H = this rank's heads (all, or heads / tp once q and kv are column-parallel), read from the shape
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(ctx.to(x.dtype)).view(B, S, -1, 2, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        p = self.attn_dropout if self.training else 0.0
        with rng.tensor_parallel_rng() if p > 0 else contextlib.nullcontext():
            fn = F.scaled_dot_product_attention if self.attention == "sdpa" else math_attention
            y = fn(q, k, v, dropout_p=p)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, W]
        return self.drop(self.proj(y))


class ImagePositions(nn.Module):
    """`model.fusion.image_positions`: a learned position per image token ([1 + N, W_img], CLS first), added
    to the tokens the fusion encoder attends to. The tower's own positions enter at its input and fade
    through its blocks (a linear probe reads a patch's side from its output token 0.88 of the time, #20);
    here each key and value carries its place again, so a relation ("red ... left of ...") can be read
    from where the matching patches are. A module of its own (not a tensor the caller adds) so ZeRO-3's
    forward hooks gather it. Replicated under tensor parallelism."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(tokens, width))  # [1 + N, W_img]; "embedding": no decay

    def forward(self, image_tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """image_tokens [B, 1 + N_vis, W_img] (CLS, then the visible patches in the order the tower kept
        them), ids_restore [B, N] (the tower's inverse shuffle; identity when every patch is seen) -> the
        tokens plus their positions, same shape."""
        B, S, W = image_tokens.shape
        pos = self.embedding.to(image_tokens.dtype)  # [1 + N, W]
        keep = torch.argsort(ids_restore, dim=1, stable=True)[:, : S - 1]  # [B, N_vis]: kept patch indices
        patches = pos[1:][keep]  # [B, N_vis, W]
        return image_tokens + torch.cat([pos[:1].expand(B, 1, W), patches], dim=1)


class FusionBlock(nn.Module):
    def __init__(self, width: int, heads: int, ctx_width: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.ln_1 = layer_norm(width)
        self.attn = Attention(width, heads, dropout, attn_dropout)
        self.ln_x = layer_norm(width)
        self.cross = CrossAttention(width, heads, ctx_width, dropout, attn_dropout)
        self.ln_2 = layer_norm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act, dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), False, key_padding_mask)
        x = x + self.cross(self.ln_x(x), ctx)
        return x + self.mlp(self.ln_2(x))


class FusionEncoder(nn.Module):
    """Text tokens [B, T, W_text] + image tokens [B, S, W_img] -> fused text tokens [B, T, W] (after
    `ln_final`). `text_in` maps the text tower's width to the fusion width (a plain linear even when
    they are equal, so the parameter set does not depend on the widths)."""

    def __init__(self, text_width: int, image_width: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", dropout: float = 0.0, attn_dropout: float = 0.0,
                 context_length: int = 0, image_tokens: int = 0):
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.text_in = nn.Linear(text_width, width)
        # `model.fusion.text_positions`: [context_length, W], replicated under TP; None: no parameter
        self.text_pos = nn.Parameter(torch.zeros(context_length, width)) if context_length > 0 else None
        # `model.fusion.image_positions`: [1 + N, W_img], applied by the caller (`place`); None: no parameter
        self.image_pos = ImagePositions(image_tokens, image_width) if image_tokens > 0 else None
        self.resblocks = nn.ModuleList(FusionBlock(width, heads, image_width, mlp_ratio, act, dropout,
                                                   attn_dropout) for _ in range(layers))
        self.ln_final = layer_norm(width)
        self.grad_checkpointing = False  # set by `parallelize.set_activation_checkpointing`

    def place(self, image_tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The image tokens this encoder attends to: the tower's tokens [B, 1 + N_vis, W_img] plus their
        learned positions with `model.fusion.image_positions` (ids_restore [B, N] from the tower's pass says
        which patches are visible), as they are without. Applied once per image pass, before the ITM's
        gather across ranks, so a negative image drawn from another rank arrives with its positions."""
        return image_tokens if self.image_pos is None else self.image_pos(image_tokens, ids_restore)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """key_padding_mask [B, T] bool, True = padding (never attended to by the self-attention)."""
        x = self.text_in(text_tokens)  # [B, T, W]
        if self.text_pos is not None:
            x = x + self.text_pos[: x.shape[1]].to(x.dtype)  # + [T, W]
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, image_tokens, key_padding_mask, use_reentrant=False,
                               context_fn=rng.checkpoint_contexts)
            else:
                x = blk(x, image_tokens, key_padding_mask)
        return self.ln_final(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The towers' (OpenAI CLIP) init: std W^-0.5 for q/kv/qkv and the input map, (2W)^-0.5 for fc1,
        W^-0.5 (2L)^-0.5 for the three projections writing into the residual stream (here 3 per block,
        so 3L of them); biases 0, norms identity."""
        std = self.width ** -0.5
        proj_std = std * (3 * max(self.layers, 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        nn.init.normal_(self.text_in.weight, std=self.text_in.in_features ** -0.5)
        nn.init.zeros_(self.text_in.bias)
        if self.text_pos is not None:
            nn.init.normal_(self.text_pos, std=0.01)  # the text tower's positional init
        if self.image_pos is not None:
            # the vision tower's positional init, N(0, W_img^-1)
            nn.init.normal_(self.image_pos.embedding, std=self.image_pos.embedding.shape[1] ** -0.5)
        for ln in self.layer_norms():
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        for blk in self.resblocks:
            for lin, s in ((blk.attn.qkv, std), (blk.attn.proj, proj_std), (blk.cross.q, std),
                           (blk.cross.kv, blk.cross.kv.in_features ** -0.5), (blk.cross.proj, proj_std),
                           (blk.mlp.fc1, fc_std), (blk.mlp.fc2, proj_std)):
                nn.init.normal_(lin.weight, std=s)
                nn.init.zeros_(lin.bias)

    def layer_norms(self) -> list[nn.LayerNorm]:
        out = [self.ln_final]
        for blk in self.resblocks:
            out += [blk.ln_1, blk.ln_x, blk.ln_2]
        return out


class ITMHead(nn.Module):
    """Image-text match logit pair [B, 2] (index 1 = match) from the fused token at the caption's pool
    position. Replicated under tensor parallelism (2 outputs)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
