"""Prediction heads on top of the towers."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.models.transformer import layer_norm


class MLMHead(nn.Module):
    """BERT's LM head: dense W->W, GELU, LayerNorm, decoder W->vocab with bias.

    The decoder is NOT tied to the text tower's token embedding: under ZeRO-3 a parameter owned by one
    module and used inside another module's forward is not gathered there, and tying also couples
    the CLIP-exported embedding table to the MLM objective.
    """

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = layer_norm(width)
        self.decoder = nn.Linear(width, vocab_size)  # vocabulary-parallel (column) under TP
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT: N(0, 0.02^2) weights, zero biases, identity norm."""
        for lin in (self.dense, self.decoder):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, W] -> logits [B, L, V] (with tensor parallelism [B, L, V / tp], this rank's slice)."""
        return self.decoder(self.norm(self.act(self.dense(x))))
