"""MAE's masked-image loss: mean squared error on the pixels of masked patches only."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3], patches in row-major order (as the ViT's conv1 emits them) and
    pixels inside a patch ordered (row, column, channel) as in MAE."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: [B, N, p*p*C] -> [B, C, H, W] (for visualisation)."""
    B, N, _ = x.shape
    h = int(round(N ** 0.5))
    if h * h != N:
        raise ValueError(f"{N} patches do not form a square grid")
    x = x.reshape(B, h, h, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, h * p, h * p)


def mim_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True, norm_pix_eps: float = 1e-6) -> torch.Tensor:
    """pred [B, N, p*p*3], images [B, 3, S, S], mask [B, N] (1 = masked) -> scalar fp32 loss.

    With `norm_pix_loss` each target patch is normalised by its own mean and variance (MAE's setting
    that gives better representations); `norm_pix_eps` is added to the variance first (MAE: 1e-6; a
    larger floor keeps near-flat patches from becoming amplified noise). Visible patches are left out:
    predicting them is trivial.
    """
    target = patchify(images.float(), patch_size)  # [B, N, p*p*3]
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + norm_pix_eps) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def feature_mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred [B, N, W], target [B, N, W] (the full view's patch tokens), mask [B, N] (1 = masked) ->
    scalar fp32 mean squared error to the layer-normed target on masked patches.

    The target gets no gradient (it is a teacher, and a loss that could move it would pull it toward
    whatever is easiest to predict) and a parameter-free layer norm, so its scale is fixed whatever the
    encoder's `ln_post` learns."""
    t = target.detach().float()
    t = torch.nn.functional.layer_norm(t, t.shape[-1:])
    per_patch = (pred.float() - t).pow(2).mean(dim=-1)  # [B, N]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)
