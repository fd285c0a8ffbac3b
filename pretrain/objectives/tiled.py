"""Memory-efficient contrastive losses: InfoNCE and SigLIP over chunk x chunk tiles of the logits.

The plain losses hold the B_local x B_global logits (and autograd keeps their softmax / sigmoid
too), which at B = 65536 is 16 GiB per fp32 matrix. Here each loss is a custom autograd Function that
visits the logits tile by tile: forward keeps only per-row running log-sum-exps ([B_local] vectors),
backward recomputes every tile from the saved features and accumulates the feature, scale and bias
gradients. Peak extra memory is O(chunk^2 + B x E) instead of O(B_local x B_global), for twice the
logit FLOPs (one recomputation).

Both Functions take this rank's rows `q` [n, E] and the gathered columns `k` [m, E] (from
`all_gather_with_grad`, so the gathered gradient flows back to every rank exactly as in the plain loss);
the matching column of row i is `offset + i`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tiles(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


class _TiledRowCE(torch.autograd.Function):
    """mean_i [logsumexp_j(s q_i.k_j) - s q_i.k_{offset+i}]: one direction of InfoNCE.

    The text->image direction is the same Function with the roles of the features swapped: in the
    local-loss layout each rank's text rows score against all gathered images, a row-wise softmax too.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        n, m = q.shape[0], k.shape[0]
        lse = torch.empty(n, dtype=q.dtype, device=q.device)
        for r0, r1 in _tiles(n, chunk):
            qs = q[r0:r1] * scale
            run = None
            for c0, c1 in _tiles(m, chunk):
                t = torch.logsumexp(qs @ k[c0:c1].T, dim=1)  # streaming log-sum-exp over column tiles
                run = t if run is None else torch.logaddexp(run, t)
            lse[r0:r1] = run
        pos = (q * k[offset:offset + n]).sum(-1)  # [n] raw positive similarities
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - scale * pos).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, scale, lse = ctx.saved_tensors
        offset, chunk = ctx.offset, ctx.chunk
        n, m = q.shape[0], k.shape[0]
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        dscale = torch.zeros((), dtype=q.dtype, device=q.device)
        for r0, r1 in _tiles(n, chunk):
            qr = q[r0:r1]
            for c0, c1 in _tiles(m, chunk):
                raw = qr @ k[c0:c1].T
                p = torch.exp(scale * raw - lse[r0:r1, None])  # softmax probabilities of this tile
                dq[r0:r1] += p @ k[c0:c1]
                dk[c0:c1] += p.T @ qr
                dscale += (p * raw).sum()
        kpos = k[offset:offset + n]
        dscale = dscale - (q * kpos).sum()
        g = grad / n
        # in place: at B = 65536 every [B, E] temporary is another 128 MiB
        dq.sub_(kpos).mul_(g * scale)
        dk[offset:offset + n].sub_(q)
        dk.mul_(g * scale)
        return dq, dk, (g * dscale).reshape(scale.shape), None, None


class _TiledSigLIP(torch.autograd.Function):
    """-(1/n) sum_ij log sigmoid(z_ij (s q_i.k_j + b)), z = +1 on the matching pair and -1 elsewhere."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                offset: int, chunk: int) -> torch.Tensor:
        n, m = q.shape[0], k.shape[0]
        total = torch.zeros((), dtype=q.dtype, device=q.device)
        for r0, r1 in _tiles(n, chunk):
            for c0, c1 in _tiles(m, chunk):
                z = _signs(r0, r1, c0, c1, offset, q)
                total += F.logsigmoid(z * (scale * (q[r0:r1] @ k[c0:c1].T) + bias)).sum()
        ctx.save_for_backward(q, k, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return -total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, scale, bias = ctx.saved_tensors
        offset, chunk = ctx.offset, ctx.chunk
        n, m = q.shape[0], k.shape[0]
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        dscale = torch.zeros((), dtype=q.dtype, device=q.device)
        dbias = torch.zeros((), dtype=q.dtype, device=q.device)
        for r0, r1 in _tiles(n, chunk):
            qr = q[r0:r1]
            for c0, c1 in _tiles(m, chunk):
                z = _signs(r0, r1, c0, c1, offset, q)
                raw = qr @ k[c0:c1].T
                dl = -z * torch.sigmoid(-z * (scale * raw + bias))  # d(-log sigmoid(z l))/dl
                dq[r0:r1] += dl @ k[c0:c1]
                dk[c0:c1] += dl.T @ qr
                dscale += (dl * raw).sum()
                dbias += dl.sum()
        g = grad / n
        return (dq.mul_(g * scale), dk.mul_(g * scale), (g * dscale).reshape(scale.shape),
                (g * dbias).reshape(bias.shape), None, None)


def _signs(r0: int, r1: int, c0: int, c1: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    """z of tile rows [r0, r1) x columns [c0, c1): +1 where column == offset + row, else -1."""
    rows = torch.arange(r0, r1, device=like.device)[:, None] + offset
    cols = torch.arange(c0, c1, device=like.device)[None, :]
    return torch.where(rows == cols, 1.0, -1.0).to(like.dtype)


def tiled_row_ce(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, chunk: int
                 ) -> torch.Tensor:
    """One InfoNCE direction without materialising the logits (see `_TiledRowCE`)."""
    return _TiledRowCE.apply(q, k, scale, offset, chunk)


def tiled_siglip(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int,
                 chunk: int) -> torch.Tensor:
    """SigLIP's sigmoid loss of rows `q` against columns `k`, tile by tile (see `_TiledSigLIP`)."""
    return _TiledSigLIP.apply(q, k, scale, bias, offset, chunk)


def plain_siglip(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int
                 ) -> torch.Tensor:
    """The same sigmoid loss with the whole [n, m] logit matrix (autograd does the backward)."""
    logits = scale * q @ k.T + bias
    z = _signs(0, q.shape[0], 0, k.shape[0], offset, q)
    return -F.logsigmoid(z * logits).sum() / q.shape[0]
