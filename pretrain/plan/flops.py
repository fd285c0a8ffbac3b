"""Analytic matmul FLOPs per training sample, for MFU (`pretrain bench step`).

Counts 2 FLOPs per multiply-add of every matrix product the model runs for one sample in training mode
(FLIP: the image encoder sees only the visible patches), and nothing else (norms, softmax, GELU,
embedding look-ups and the optimizer are a few percent at most and are not what a peak FLOP/s rate
measures). Forward + backward = 3 x forward (backward computes two products per forward one). These
are *model* FLOPs: recomputation by activation checkpointing or by the tiled contrastive loss is work
done on top and is deliberately not counted, so MFU does not reward recomputation.

Per transformer block of width W, hidden H = int(W * mlp_ratio), T tokens:
  projections 2T(3W^2 + W^2 + 2WH)   (qkv, attention output, MLP fc1 + fc2)
  attention   4 P W                  (QK^T and AV; P = T^2 bidirectional, T(T+1)/2 causal: the pairs
                                      a causal kernel actually computes)
"""

from __future__ import annotations

from typing import Any

from pretrain.config import Config


def block_flops(width: int, tokens: int, mlp_ratio: float, causal: bool = False) -> int:
    """Forward matmul FLOPs of one transformer block over `tokens` tokens (one sample)."""
    hidden = int(width * mlp_ratio)
    proj = 2 * tokens * (4 * width * width + 2 * width * hidden)
    pairs = tokens * (tokens + 1) // 2 if causal else tokens * tokens
    return proj + 4 * pairs * width


def visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder keeps, exactly as `random_masking` rounds them."""
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def flops_per_sample(cfg: Config, vocab_size: int, global_batch: int | None = None) -> dict[str, Any]:
    """Forward matmul FLOPs of one training sample by component, and the fwd+bwd total.

    `vocab_size` is the padded vocabulary (the MLM head's output width); `global_batch` is the
    number of columns each contrastive row is scored against (default: micro_batch, one rank).
    """
    m, o = cfg.model, cfg.objectives
    v, t, d = m.vision, m.text, m.decoder
    use_con, use_mim, use_mlm = o.contrastive.weight > 0, o.mim.weight > 0, o.mlm.weight > 0
    n = (m.image_size // v.patch_size) ** 2
    n_vis = visible_patches(n, o.mim.mask_ratio)
    cols = global_batch or cfg.train.micro_batch
    parts: dict[str, int] = {}
    if use_con or use_mim:  # the pass over the visible patches (FLIP and/or MAE)
        parts["vision_encoder"] = (2 * n * 3 * v.patch_size ** 2 * v.width  # patch embedding (all patches)
                                   + v.layers * block_flops(v.width, 1 + n_vis, m.mlp_ratio))
        parts["vision_proj"] = 2 * v.width * m.embed_dim  # the tower always pools, used or not
    if use_con and use_mim and not o.mim.shared_pass:  # separate views: the contrastive pass sees every patch
        parts["vision_encoder_full"] = (2 * n * 3 * v.patch_size ** 2 * v.width
                                        + v.layers * block_flops(v.width, 1 + n, m.mlp_ratio))
        parts["vision_proj_full"] = 2 * v.width * m.embed_dim
    if use_con:
        parts["text_causal"] = t.layers * block_flops(t.width, t.context_length, m.mlp_ratio, causal=True)
        parts["text_proj"] = 2 * t.width * m.embed_dim
        directions = 1 if o.contrastive.loss == "siglip" else 2
        parts["contrastive_logits"] = directions * 2 * cols * m.embed_dim
    if use_mim:
        parts["decoder"] = (2 * (1 + n_vis) * v.width * d.width  # decoder_embed on CLS + visible tokens
                            + d.layers * block_flops(d.width, 1 + n, m.mlp_ratio)
                            + 2 * (1 + n) * d.width * (v.width if o.mim.target == "features"
                                                       else v.patch_size ** 2 * 3))  # prediction head
    if use_mlm:
        parts["text_mlm"] = t.layers * block_flops(t.width, t.context_length, m.mlp_ratio, causal=False)
        parts["mlm_head"] = 2 * t.context_length * (t.width * t.width + t.width * vocab_size)
    forward = sum(parts.values())
    return {"parts": parts, "forward": forward, "train": 3 * forward, "visible_patches": n_vis,
            "patches": n, "contrastive_columns": cols}
