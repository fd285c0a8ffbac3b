"""CLIP's symmetric InfoNCE with the "local loss" over data-parallel ranks.

Each rank scores only its own B_local rows against the B_global columns gathered from every rank, so
memory and compute per rank are B_local x B_global rather than B_global^2. Why this reproduces the
full-batch gradient: with L = mean_r L_r the full-batch loss, the backward of `all_gather_with_grad`
sums over ranks, so rank r's features receive sum_s dL_s/dfeat_r = dp * dL/dfeat_r; the parameter
gradient on rank r is J_r^T (dp * dL/dfeat_r), and DeepSpeed's mean over the dp ranks turns
(1/dp) sum_r J_r^T dp dL/dfeat_r into exactly dL/dparams. The logit scale is not gathered: its
per-rank gradients dL_r/dscale average to dL/dscale as well.

`loss="siglip"` swaps in SigLIP's pairwise sigmoid loss (each rank: its rows against every gathered
column, normalised by B_local, so mean_r L_r is again the full-batch loss and the same argument holds);
`chunk > 0` computes either loss tile by tile without the logits (`pretrain/objectives/tiled.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.collectives import all_gather_with_grad
from pretrain.objectives.tiled import plain_siglip, tiled_row_ce, tiled_siglip

LOSSES = ("infonce", "siglip")


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     group=None, *, loss: str = "infonce", chunk: int = 0,
                     logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """img [B, E], txt [B, E] (this rank's pairs, unnormalised), logit_scale: the multiplicative scale
    (exp of the learned log scale, already clamped) -> this rank's loss (CE_img->txt + CE_txt->img) / 2.

    Computed in at least fp32 whatever the feature dtype (bf16 logits saturate the softmax); every rank
    must hold the same B. Not distributed, it is the plain single-batch CLIP loss. `loss="siglip"` needs
    `logit_bias` (the learned additive bias); `chunk > 0` tiles the logits (same value and gradients).
    """
    if loss not in LOSSES:
        raise ValueError(f"contrastive loss {loss!r} is not one of {', '.join(LOSSES)}")
    if loss == "siglip" and logit_bias is None:
        raise ValueError("the siglip loss needs logit_bias")
    dtype = torch.promote_types(img.dtype, torch.float32)
    img = F.normalize(img.to(dtype), dim=-1)
    txt = F.normalize(txt.to(dtype), dim=-1)
    txt_all, offset = all_gather_with_grad(txt, group)  # [B_global, E]
    scale = logit_scale.to(dtype)
    if loss == "siglip":
        bias = logit_bias.to(dtype)  # type: ignore[union-attr]
        if chunk > 0:
            return tiled_siglip(img, txt_all, scale, bias, offset, chunk)
        return plain_siglip(img, txt_all, scale, bias, offset)
    img_all, _ = all_gather_with_grad(img, group)  # the sigmoid loss needs one direction only
    if chunk > 0:
        return (tiled_row_ce(img, txt_all, scale, offset, chunk)
                + tiled_row_ce(txt, img_all, scale, offset, chunk)) / 2
    labels = torch.arange(img.shape[0], device=img.device) + offset  # my rows' columns
    logits_img = scale * img @ txt_all.T  # [B_local, B_global]
    logits_txt = scale * txt @ img_all.T
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2
