"""Image-text matching (ALBEF): hard negatives mined from the contrastive similarities over the whole
data-parallel batch, and the match loss.

How a negative reaches the rank that needs it. Mining runs on the gathered, normalised features
(`all_gather_no_grad`, B_global x E: what the contrastive loss gathers anyway), so rank r may pick a
caption or image held by rank s. The fusion encoder needs that negative's TOKENS, not its feature:
the model gathers every rank's text tokens [B, L, W_text] and image tokens [B, S, W_img] with
`parallel.collectives.all_gather_with_grad` and indexes the drawn global rows. Its backward all-reduces
the token gradients and hands each rank its own rows, so the towers of the rank that OWNS a negative
get the gradient of its use on every other rank -- the same accounting as the contrastive loss's
gathered features (rank r's rows receive sum_s dL_s/dtok_r, and DeepSpeed's mean over the dp ranks makes
it the full-batch gradient). Cost: one gather of B_global token tensors per step (B_global x (L W_text
+ S W_img) values per rank); a point-to-point exchange of only the drawn rows would cut that to 2B rows.

Sampling is layout-independent: each local row draws its negative by inverse CDF from
softmax(scale * similarity) over the global columns, with its own two uniforms (`batch["itm_noise"]`,
from the data pipeline's per-sample RNG of (seed, epoch, key)); TP peers hold the same rows and draw the
same negatives. Without uniforms (eval mode, or batches without the key) the hardest negative (argmax)
is taken. Columns whose caption is token-identical to the row's own (duplicate captions: not a
negative) are never drawn, unless a row has nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.collectives import all_gather_no_grad


@torch.no_grad()
def hard_negatives(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor,
                   group=None, uniform: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img, txt [B, E] (this rank's features), ids [B, L] (its captions' token ids), scale: the logit scale
    -> (negative caption per image [B], negative image per caption [B]) as GLOBAL row indices into the
    batch gathered over `group`, and the gathered ids [B_global, L]. `uniform` [B, 2] or None (argmax)."""
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    img_all = all_gather_no_grad(img, group)  # [B_global, E]
    txt_all = all_gather_no_grad(txt, group)
    ids_all = all_gather_no_grad(ids, group)  # [B_global, L]
    same = caption_hash(ids)[:, None] == caption_hash(ids_all)[None, :]  # [B, B_global]: own + duplicates
    u_t = u_i = None
    if uniform is not None:
        u_t, u_i = uniform[:, 0], uniform[:, 1]
    neg_txt = _draw_simple(img @ txt_all.T, same, scale.float(), u_t)
    neg_img = _draw_simple(txt @ img_all.T, same, scale.float(), u_i)
    return neg_txt, neg_img, ids_all


def caption_hash(ids: torch.Tensor) -> torch.Tensor:
    """ids [B, L] -> int64 [B], equal for token-identical rows (a polynomial hash, wrapping in int64), so
    duplicates are found without a [B, B_global, L] comparison."""
    coeff = torch.tensor([pow(1_000_003, k, 2 ** 61 - 1) for k in range(ids.shape[1])], device=ids.device)
    return (ids.long() * coeff).sum(dim=-1)


def _draw_simple(sim: torch.Tensor, excluded: torch.Tensor, scale: torch.Tensor,
                 uniform: torch.Tensor | None) -> torch.Tensor:
    """Inverse-CDF draw from softmax(scale * sim) over the columns not `excluded`; a row with every column
    excluded (a batch of one caption) takes its most similar column."""
    empty = excluded.all(dim=-1, keepdim=True)  # [B, 1]
    logits = (scale * sim).masked_fill(excluded & ~empty, float("-inf"))  # [B, B_global]
    if uniform is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1)  # [B, B_global]
    target = uniform.to(cdf.dtype).clamp(0, 1).unsqueeze(-1) * cdf[:, -1:]  # [B, 1]
    # the first column whose cdf exceeds u * total: never a zero-probability (excluded) column
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    idx = idx.clamp(max=sim.shape[1] - 1)
    # u = 1 (or rounding at the top of the cdf) runs past the last column: take the hardest instead
    drawn_zero = probs.gather(1, idx[:, None]).squeeze(1) == 0
    return torch.where(drawn_zero, logits.argmax(dim=-1), idx)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N, 2], labels [N] (1 = match) -> fp32 mean cross-entropy. Every rank holds the same number
    of pairs (3 B), so the mean over dp ranks is the full-batch loss."""
    return F.cross_entropy(logits.float(), labels)
