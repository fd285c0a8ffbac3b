"""MAE pixel decoder: re-inserts mask tokens among the encoded visible patches and predicts pixels.

Positions are a FIXED 2-D sin-cos table (MAE's default): the decoder is discarded after pretraining,
a fixed table costs no optimizer state and keeps reconstruction from leaning on learned positions.
It is a non-persistent buffer rebuilt from the config, so it never appears in checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.models.transformer import Transformer, layer_norm


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, dim]: sin of pos * omega in the first half, cos in the second."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[grid*grid (+1), dim] table, half the channels for the row and half for the column index
    (MAE's get_2d_sincos_pos_embed); the CLS position is all zeros."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # patch (r, c) at index r*g + c
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class MAEDecoder(nn.Module):
    def __init__(self, grid_size: int, patch_size: int, in_width: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", dropout: float = 0.0,
                 attn_dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        self.grid_size, self.patch_size = grid_size, patch_size
        self.num_patches = grid_size ** 2
        self.decoder_embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))
        self.register_buffer("decoder_pos_embed", sincos_2d(width, grid_size)[None], persistent=False)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act, dropout, attn_dropout)
        self.decoder_norm = layer_norm(width)
        # pixels of a patch (MAE), or `out_dim` features per patch (objectives.mim.target=features)
        self.decoder_pred = nn.Linear(width, out_dim or patch_size * patch_size * 3)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE: xavier-uniform linears, mask token N(0, 0.02^2); CLIP's scheme inside the blocks."""
        for lin in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.ones_(self.decoder_norm.weight)
        nn.init.zeros_(self.decoder_norm.bias)
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x [B, 1 + N_vis, W_enc] (CLS first), ids_restore [B, N] -> predictions [B, N, p*p*3 or out_dim]."""
        x = self.decoder_embed(x)  # [B, 1 + N_vis, D]
        B, N = ids_restore.shape
        D = x.shape[-1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], D)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, N, D] in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1)  # [B, 1 + N, D]
        x = x + self.decoder_pos_embed.to(device=x.device, dtype=x.dtype)
        x = self.transformer(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:]  # [B, N, p*p*3 or out_dim], CLS dropped
