"""`pretrain eval --rerank K`: image-text matching re-ranking of the top-K contrastive retrieval candidates.

For every query (an image for i2t, a caption for t2i) the dual encoder's similarities pick the K best
candidates from the gathered features (the same features `metrics_from_features` scores; among equal
similarities the query's own pair comes first, plain recall's tie rule, so the pair is a candidate exactly
when plain retrieval counts it at recall@K, even among duplicate captions); the fusion
encoder then scores each (query, candidate) pair with the ITM head and the candidates are re-ordered by
that score. A query is a hit at R@1 when its own pair is among the K candidates and no other candidate
scores strictly higher (the tie rule of plain retrieval). `rerank_candidates_recall` is the fraction of
queries whose pair made the top K: the ceiling of the re-ranked R@1. `*_rerank_sim_r1` re-orders the same
candidates by the ITM score plus the contrastive logit (logit scale x cosine), both logits, as BLIP's
retrieval ranks by ITM plus similarity: the fusion encoder then only has to break the dual encoder's near
ties, not replace its ranking.

On any number of ranks: the candidates need each pair's caption ids and pixels, gathered with the
features (`shard_features(..., pairs=True)`: O(N) pixels, so meant for held-out sets up to ~10^5
pairs); query rows are dealt in blocks over the ranks as the retrieval counts are, each rank runs the
fusion forwards of its blocks on its replica of the model (`pretrain eval` loads full weights on every
rank, so these forwards are not collective), and the integer hit counts are all-reduced: the result
equals one process's.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.evaluation.distributed import BLOCK, _all_reduce, _my_blocks


@torch.no_grad()
def top_k(q: torch.Tensor, keys: torch.Tensor, k: int, block: int = BLOCK,
          pair: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [b, k] of the k keys most similar to each row of q [b, E], over column tiles of `block`
    (never b x N at once when N > block); ties favour the lower index, as a stable sort would, except that
    with `pair` [b] (each query's own key) that key goes first among its equals: plain retrieval counts a
    tie for the pair, so the pair is among the k exactly when fewer than k keys score strictly higher."""
    best_s = best_i = None
    for c in range(0, len(keys), block):
        s = q @ keys[c:c + block].T  # [b, block]
        i = torch.arange(c, c + s.shape[1], device=q.device).expand_as(s)
        if best_s is not None:
            s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
        if pair is not None:  # the pair to the front; the stable sort below keeps it first among ties
            is_pair = (i == pair[:, None]).to(torch.uint8)
            front = torch.sort(is_pair, dim=1, descending=True, stable=True).indices
            s, i = s.gather(1, front), i.gather(1, front)
        kk = min(k, s.shape[1])
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kk]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_i  # type: ignore[return-value]


@torch.no_grad()
def _pair_scores(model: Any, text_tok: torch.Tensor, ids: torch.Tensor, image_tok: torch.Tensor,
                 batch: int) -> torch.Tensor:
    """ITM scores [N] of N aligned (caption, image) pairs, `batch` pairs per fusion forward."""
    return torch.cat([model.itm_score(text_tok[s:s + batch], ids[s:s + batch], image_tok[s:s + batch])
                      for s in range(0, len(ids), batch)])


@torch.no_grad()
def rerank_counts(model: Any, feats: dict[str, torch.Tensor], k: int, block: int = 64,
                  pair_batch: int = 256) -> dict[str, int]:
    """Hit counts summed over ranks: `i2t`/`t2i` re-ranked R@1 and `*_in_top_k` (pair among the K).
    `feats` holds `image`, `text` (normalised features), `ids` [N, L] and `pixels` [N, 3, S, S]."""
    img, txt, ids, pixels = feats["image"], feats["text"], feats["ids"], feats["pixels"]
    device = next(model.parameters()).device
    n = len(img)
    k = min(k, n)
    scale = float(model.logit_scale.float().exp())
    # per direction d: [3d] hits, [3d + 1] pair in top k, [3d + 2] hits ranked by ITM + contrastive logit
    t = torch.zeros(6, dtype=torch.int64, device=img.device)
    for start in _my_blocks(n, block):
        rows = torch.arange(start, min(start + block, n), device=img.device)  # [b]
        b = len(rows)
        for d, (q, keys) in enumerate(((img, txt), (txt, img))):
            cand = top_k(q[rows], keys, k, pair=rows)  # [b, k] global indices, the pair first among ties
            flat = cand.reshape(-1)  # [b k]
            if d == 0:  # i2t: query images, candidate captions
                image_tok = model.image_tokens(pixels[rows].to(device)).repeat_interleave(k, dim=0)
                pair_ids = ids[flat].to(device)
                text_tok = model.text_tokens(pair_ids)
            else:  # t2i: query captions, candidate images
                pair_ids = ids[rows].to(device).repeat_interleave(k, dim=0)
                text_tok = model.text_tokens(ids[rows].to(device)).repeat_interleave(k, dim=0)
                image_tok = model.image_tokens(pixels[flat].to(device))
            scores = _pair_scores(model, text_tok, pair_ids, image_tok, pair_batch).view(b, k).to(img.device)
            sims = (q[rows][:, None, :] * keys[cand]).sum(dim=-1).float()  # [b, k] cosines
            is_pos = cand == rows[:, None]  # [b, k]
            found = is_pos.any(dim=1)
            t[3 * d] += _hits(scores.float(), is_pos, found)
            t[3 * d + 1] += int(found.sum())
            t[3 * d + 2] += _hits(scores.float() + scale * sims, is_pos, found)
    _all_reduce(t)
    return {"i2t": int(t[0]), "i2t_in_top_k": int(t[1]), "i2t_sim": int(t[2]),
            "t2i": int(t[3]), "t2i_in_top_k": int(t[4]), "t2i_sim": int(t[5])}


def _hits(scores: torch.Tensor, is_pos: torch.Tensor, found: torch.Tensor) -> int:
    """Queries whose pair is among the candidates and scores no lower than any of them (scores [b, k])."""
    pos_score = torch.where(is_pos, scores, torch.full_like(scores, float("-inf"))).amax(dim=1)  # [b]
    return int((found & ((scores > pos_score[:, None]).sum(dim=1) < 1)).sum())


def rerank_metrics(model: Any, feats: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """`pretrain eval --rerank K` keys: `i2t_rerank_r1`, `t2i_rerank_r1`, `i2t_rerank_sim_r1`,
    `t2i_rerank_sim_r1`, `i2t_rerank_candidates_recall`, `t2i_rerank_candidates_recall` (fractions of the N
    queries) and `rerank_k`."""
    if getattr(model, "itm_head", None) is None:
        raise ValueError("--rerank needs a checkpoint trained with a fusion encoder and ITM "
                         "(model.fusion.layers > 0, objectives.itm.weight > 0); this one has none")
    if k < 1:
        raise ValueError(f"--rerank K must be >= 1, got {k}")
    c = rerank_counts(model, feats, k)
    n = max(len(feats["image"]), 1)
    return {"i2t_rerank_r1": round(c["i2t"] / n, 6), "t2i_rerank_r1": round(c["t2i"] / n, 6),
            "i2t_rerank_sim_r1": round(c["i2t_sim"] / n, 6), "t2i_rerank_sim_r1": round(c["t2i_sim"] / n, 6),
            "i2t_rerank_candidates_recall": round(c["i2t_in_top_k"] / n, 6),
            "t2i_rerank_candidates_recall": round(c["t2i_in_top_k"] / n, 6), "rerank_k": k}
