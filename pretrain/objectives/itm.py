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

Sampling is layout-independent: a row draws its negative from softmax(scale * similarity) over the
global columns by the Gumbel-max trick, with one uniform per (row, column) hashed from the two samples'
own uniforms (`batch["itm_noise"]`, from the data pipeline's per-sample RNG of (seed, epoch, key)). So the
draw depends on which samples meet, never on where they sit in the gathered batch: another number of
ranks (which orders the global batch differently) or a resume draws the same negatives, and TP peers
(same rows) draw the same. Without uniforms (eval mode, or batches without the key) the hardest
negative (argmax) is taken. Columns whose caption is token-identical to the row's own (the pair itself
and duplicate captions: not negatives) are never drawn, unless a row has nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from parallel.collectives import all_gather_no_grad, global_batch_mean


@torch.no_grad()
def hard_negatives(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor,
                   group=None, uniform: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img, txt [B, E] (this rank's features), ids [B, L] (its captions' token ids), scale: the logit scale
    -> (negative caption per image [B], negative image per caption [B]) as GLOBAL row indices into the
    batch gathered over `group`, and the gathered ids [B_global, L]. `uniform` [B, 2] (this rank's
    samples' draws: column 0 for the caption draw, 1 for the image draw) or None (argmax)."""
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    img_all = all_gather_no_grad(img, group)  # [B_global, E]
    txt_all = all_gather_no_grad(txt, group)
    ids_all = all_gather_no_grad(ids, group)  # [B_global, L]
    same = caption_hash(ids)[:, None] == caption_hash(ids_all)[None, :]  # [B, B_global]: own + duplicates
    noise_t = noise_i = None
    if uniform is not None:
        u_all = all_gather_no_grad(uniform.float(), group)  # [B_global, 2]
        noise_t = pair_uniforms(uniform[:, 0], u_all[:, 0])  # [B, B_global]
        noise_i = pair_uniforms(uniform[:, 1], u_all[:, 1])
    neg_txt = draw(img @ txt_all.T, same, scale.float(), noise_t)
    neg_img = draw(txt @ img_all.T, same, scale.float(), noise_i)
    return neg_txt, neg_img, ids_all


def caption_hash(ids: torch.Tensor) -> torch.Tensor:
    """ids [B, L] -> int64 [B], equal for token-identical rows (a polynomial hash, wrapping in int64), so
    duplicates are found without a [B, B_global, L] comparison."""
    coeff = torch.tensor([pow(1_000_003, k, 2 ** 61 - 1) for k in range(ids.shape[1])], device=ids.device)
    return (ids.long() * coeff).sum(dim=-1)


def pair_uniforms(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows [B], cols [C] uniforms -> [B, C] uniforms in (0, 1), a hash of each (row, column) pair's two
    values (24 bits each; a splitmix-style integer mix, wrapping in int64): independent of the columns'
    order and of the device."""
    a = (rows.double() * 2 ** 24).long()[:, None]
    b = (cols.double() * 2 ** 24).long()[None, :]
    h = a * 0x9E3779B1 + b * 0x85EBCA77 + 0x165667B1
    h = h ^ (h >> 29)
    h = h * 0x27D4EB2F
    h = h ^ (h >> 32)
    h = h * 0x165667B1
    h = h ^ (h >> 15)
    return ((h & 0xFFFFFF).double() + 0.5) / 2 ** 24


def draw(sim: torch.Tensor, excluded: torch.Tensor, scale: torch.Tensor,
         noise: torch.Tensor | None) -> torch.Tensor:
    """One column per row of sim [B, C] from softmax(scale * sim) over the columns not `excluded`, by the
    Gumbel-max trick with `noise` [B, C] uniforms (None: the argmax); a row with every column excluded (a
    batch of one caption) takes its most similar column."""
    empty = excluded.all(dim=-1, keepdim=True)  # [B, 1]
    logits = (scale * sim).double().masked_fill(excluded & ~empty, float("-inf"))  # [B, C]
    if noise is not None:
        logits = logits - torch.log(-torch.log(noise))  # + Gumbel(0, 1)
    return logits.argmax(dim=-1)


@torch.no_grad()
def swap_words(ids: torch.Tensor, eos: torch.Tensor, uniform: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L], eos [B] (each caption's EOS position) -> (each caption with two of its content tokens
    swapped [B, L], valid [B]: the row had two different content tokens to swap).

    The swapped caption has the same words as the true one in another order ("blue circle left of red
    square" for "red circle left of blue square"): a negative that a bag of words cannot reject, only a
    model that binds words to what is where in the image (NegCLIP's word-order negatives, here for ITM).
    The pair (i < j, tokens differ, both between BOS and EOS) is drawn uniformly from the row's own
    uniforms `uniform` [B, 2] (the data pipeline's per-sample draws: the same on any layout and after a
    resume); None (eval) takes a fixed pair per caption."""
    B, L = ids.shape
    pos = torch.arange(L, device=ids.device)
    content = (pos[None, :] >= 1) & (pos[None, :] < eos[:, None])  # [B, L]
    ok = (content[:, :, None] & content[:, None, :] & (ids[:, :, None] != ids[:, None, :])
          & (pos[:, None] < pos[None, :])[None])  # [B, L, L]: pairs that change the caption
    u = torch.full((B,), 0.5, device=ids.device) if uniform is None else \
        pair_uniforms(uniform[:, 0].float(), uniform[:, 1].float()).diagonal()  # [B]
    score = pair_uniforms(u, (torch.arange(L * L, device=ids.device).double() + 0.5) / (L * L))  # [B, L*L]
    pick = score.masked_fill(~ok.reshape(B, L * L), -1.0).argmax(dim=-1)  # [B]
    i, j = pick // L, pick % L
    rows = torch.arange(B, device=ids.device)
    out = ids.clone()
    out[rows, i], out[rows, j] = ids[rows, j], ids[rows, i]
    return out, ok.reshape(B, -1).any(dim=-1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
             group: Any = None) -> torch.Tensor:
    """logits [N, 2], labels [N] (1 = match) -> fp32 mean cross-entropy. Every rank holds the same number
    of pairs (3 B, plus B for word-swap and B for caption negatives), so the mean over dp ranks is the
    full-batch loss.

    `weight` [N] (`objectives.itm.skew_*`): a weighted mean over the GLOBAL batch. The weights differ
    between ranks, so each rank returns its weighted sum x dp / the global weight (all-reduced over `group`
    without gradient, as `mlm_loss` does its token count): the mean over dp ranks is then exactly the
    single-process loss."""
    if weight is None:
        return F.cross_entropy(logits.float(), labels)
    total = (F.cross_entropy(logits.float(), labels, reduction="none") * weight.float()).sum()
    return global_batch_mean(total, weight.double().sum(), group, floor=1e-12)
