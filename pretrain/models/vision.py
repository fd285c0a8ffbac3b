"""Image tower: an OpenAI-CLIP ViT with MAE-style random masking of patch tokens.

Parameter names (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `transformer`,
`ln_post`, `proj`) follow OpenAI CLIP so exporters map them one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.models.transformer import Transformer, layer_norm


def random_masking(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the round(N * (1 - mask_ratio)) patches with the smallest `noise` (MAE's per-sample shuffle).

    The noise comes from the data pipeline (`batch["patch_noise"]`) rather than the global RNG, so the
    mask is reproducible across restarts, ranks and activation recomputation.
    x [B, N, W], noise [B, N] -> x_visible [B, N_vis, W], mask [B, N] (1 = masked), ids_restore [B, N]
    """
    B, N, W = x.shape
    n_keep = max(1, round(N * (1.0 - mask_ratio)))
    ids_shuffle = torch.argsort(noise.float(), dim=1, stable=True)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)  # inverse permutation
    ids_keep = ids_shuffle[:, :n_keep]  # [B, N_vis]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, W))
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return x_visible, mask, ids_restore


def spread_noise(noise: torch.Tensor, grid: int) -> torch.Tensor:
    """Re-rank the noise so that keeping its smallest values keeps patches spread evenly over the image
    (`objectives.mim.mask_layout: spread`): each patch's rank inside its 2x2 block comes first, the
    noise breaks ties. At 50% masking every block keeps two patches, at 75% one, so no region (a small
    object the caption names) is dropped whole by chance. noise [B, N], N = grid * grid, grid even
    -> [B, N] in [0, 1), same patch order."""
    B = noise.shape[0]
    h = grid // 2
    blocks = noise.float().view(B, h, 2, h, 2).permute(0, 1, 3, 2, 4).reshape(B, h, h, 4)
    rank = blocks.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(blocks.dtype)  # 0..3
    spread = (rank + blocks) / 4  # every block's rank-0 patch below every rank-1 patch, and so on
    return spread.view(B, h, h, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, grid * grid)


class VisionTower(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 embed_dim: int, mlp_ratio: float = 4.0, act: str = "gelu", dropout: float = 0.0,
                 attn_dropout: float = 0.0, block_init: str = "scaled"):
        super().__init__()
        self.block_init = block_init
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.patch_size, self.grid_size = patch_size, image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.width, self.embed_dim = width, embed_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(1 + self.num_patches, width))
        self.ln_pre = layer_norm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act, dropout, attn_dropout)
        self.ln_post = layer_norm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP: class/positional embeddings and projection ~ N(0, W^-1); the blocks as
        `model.vision.block_init` says (`Transformer.init_weights`)."""
        scale = self.width ** -0.5
        self.conv1.reset_parameters()
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        for ln in (self.ln_pre, self.ln_post):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        self.transformer.init_weights(self.block_init)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float = 0.0,
                return_features: bool = False):
        """images [B, 3, S, S] -> pooled embedding [B, E] (CLIP's image features before normalisation),
        or with `return_features` the 4-tuple documented in `forward_features`."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, W], patches in row-major order
        x = x + self.positional_embedding[1:].to(x.dtype)  # positions before masking, as MAE
        B, N, _ = x.shape

        if mask_ratio > 0:
            if noise is None:
                raise ValueError("mask_ratio > 0 needs per-sample noise [B, N] (batch['patch_noise'])")
            x, mask, ids_restore = random_masking(x, noise, mask_ratio)  # x [B, N_vis, W]
        else:
            mask = torch.zeros(B, N, device=x.device, dtype=x.dtype)
            ids_restore = torch.arange(N, device=x.device).expand(B, N)

        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + N_vis, W]
        x = self.ln_pre(x)
        x = self.transformer(x)
        # ln_post over every token: identical to CLIP's ln_post(x[:, 0]) for the CLS token, and it is
        # MAE's final encoder norm for the patch tokens handed to the decoder
        x = self.ln_post(x)  # [B, 1 + N_vis, W]
        pooled = x[:, 0] @ self.proj  # [B, E]
        return (pooled, x, mask, ids_restore) if return_features else pooled

    def forward_features(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                         mask_ratio: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass over the visible patches only.

        Returns pooled [B, E] (before normalisation), tokens [B, 1 + N_vis, W] (CLS first, AFTER
        `ln_post`), mask [B, N] (1 = masked) and ids_restore [B, N]. With mask_ratio 0 every patch is
        used, the mask is all zeros and ids_restore the identity.

        Goes through `self(...)` rather than calling the body directly so module hooks fire: ZeRO-3
        gathers this module's own parameters (class_embedding, positional_embedding, proj) only then.
        """
        return self(images, noise, mask_ratio, return_features=True)
