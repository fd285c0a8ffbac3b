"""Text tower: OpenAI CLIP's causal transformer, also run bidirectionally for masked language modeling.

The same weights serve both passes (UniLM-style): the causal pass pooled at EOS keeps the tower a
drop-in CLIP text encoder for export, the bidirectional pass over masked captions feeds the MLM head.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.models.transformer import Transformer, layer_norm

POOL_TYPES = ("eos", "argmax")
"""How the causal pass finds each caption's pooled token, set by the tokenizer (`pool_type`): `eos`, the
first `eos_id` (our BPE: [EOS] = 3); `argmax`, the highest id in the row (OpenAI CLIP, whose
<end_of_text> = 49407 is the highest id a caption holds). With `argmax` the padding id (CLIP's 0) is also
a real token, so the bidirectional pass masks the keys after the first `eos_id` instead of by id."""


class TextTower(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int, mlp_ratio: float = 4.0, act: str = "gelu", dropout: float = 0.0,
                 attn_dropout: float = 0.0,
                 eos_id: int = 3, pad_id: int = 0, pool_type: str = "eos"):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type {pool_type!r}: expected one of {', '.join(POOL_TYPES)}")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.width, self.embed_dim = width, embed_dim
        self.eos_id, self.pad_id, self.pool_type = eos_id, pad_id, pool_type
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act, dropout, attn_dropout)
        self.ln_final = layer_norm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP: tokens N(0, 0.02^2), positions N(0, 0.01^2), projection N(0, W^-1)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)
        nn.init.ones_(self.ln_final.weight)
        nn.init.zeros_(self.ln_final.bias)
        self.transformer.init_weights()

    def forward(self, ids: torch.Tensor, causal: bool = True, return_tokens: bool = False,
                pad_id: int | None = None, return_both: bool = False):
        """ids [B, T] (T <= context_length) -> text features [B, E] pooled at the first EOS token
        (before normalisation), or with `return_tokens` the hidden states [B, T, W] after `ln_final`, or
        with `return_both` the pair (features, hidden states) from the one pass (what the fusion encoder
        reads next to the contrastive features; the projection stays inside this module's call so ZeRO-3
        has it gathered).

        The causal pass needs no padding mask (tokens after EOS cannot influence it); the
        bidirectional pass masks keys equal to `pad_id` (default: the constructor's), or with
        `pool_type="argmax"` (CLIP's tokenizer, whose padding id is a real token) the keys after the
        first `eos_id`.
        """
        batch, seq_len = ids.shape
        if seq_len > self.context_length:
            raise ValueError(f"{seq_len} tokens exceed the context length {self.context_length}")
        pos = self.positional_embedding[:seq_len].to(self.token_embedding.weight.dtype)
        x = self.token_embedding(ids) + pos  # [B, T, W]
        pad = None
        if not causal and self.pool_type == "argmax" and pad_id is None:
            positions = torch.arange(seq_len, device=ids.device).expand_as(ids)
            pad = positions > (ids == self.eos_id).int().argmax(dim=-1, keepdim=True)  # [B, T]
        elif not causal:
            pad = ids == (self.pad_id if pad_id is None else pad_id)  # [B, T] True = padding
        x = self.transformer(x, causal=causal, key_padding_mask=pad)
        x = self.ln_final(x)  # [B, T, W]
        if return_tokens:
            return x
        eos = self.pool_positions(ids)  # [B]
        pooled = x[torch.arange(batch, device=x.device), eos] @ self.text_projection  # [B, E]
        return (pooled, x) if return_both else pooled

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool, True = padding: what the bidirectional pass masks (ids equal to the padding id, or
        with `pool_type="argmax"` the positions after the first `eos_id`). The fusion encoder's
        self-attention masks the same keys."""
        if self.pool_type == "argmax":
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return positions > (ids == self.eos_id).int().argmax(dim=-1, keepdim=True)
        return ids == self.pad_id

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the first EOS per row (argmax of ids == eos). A row without EOS (a caption the data
        pipeline truncated without re-appending it) falls back to its last non-padding token. With
        `pool_type="argmax"`: argmax over the ids, exactly OpenAI CLIP's pooling."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        is_eos = ids == self.eos_id
        first_eos = is_eos.int().argmax(dim=-1)
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device).expand_as(ids)
        last_real = torch.where(ids != self.pad_id, positions, 0).amax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first_eos, last_real)

    def forward_tokens(self, ids: torch.Tensor, causal: bool = False, pad_id: int | None = None
                       ) -> torch.Tensor:
        """Per-token hidden states [B, T, W] (after `ln_final`), bidirectional by default, for MLM.

        Goes through `self(...)` so module hooks fire: ZeRO-3 gathers this module's own
        `positional_embedding` only inside a module call.
        """
        return self(ids, causal=causal, return_tokens=True, pad_id=pad_id)
