"""Autograd-aware collectives used by losses."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the incoming gradients over ranks
    and returns this rank's slice. Gloo has no reduce_scatter, so the sum is an all_reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ws = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # a copy, never the incoming tensor: autograd may hand that same tensor to another branch (an add
        # passes one gradient to both its inputs), which an in-place all_reduce would turn into the sum
        # over ranks (`contiguous()` alone is a no-op on a contiguous gradient)
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(gathered [world*B, ...], offset of this rank's rows). Equal B on every rank is required.

    Not distributed (or a group of one): returns `x` and 0 unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    return _AllGatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 ([world*B, ...]), outside autograd (token ids, mining
    scores). Equal B on every rank is required; not distributed: `x` unchanged."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def global_batch_mean(total: torch.Tensor, count: torch.Tensor, group=None, floor: float = 1.0
                      ) -> torch.Tensor:
    """This rank's share of a mean over the GLOBAL batch: `total` (a sum with gradient) x dp / the count
    summed over `group` (no gradient: a constant of the batch; floored at `floor`). Ranks may hold uneven
    counts (MLM's masked tokens, ITM's skewed weights); the mean over dp ranks of what each returns -- what
    is logged and what DeepSpeed's gradient averaging differentiates -- is the single-process mean."""
    count = count.detach().to(total.device, torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
        return total * dist.get_world_size(group) / count.clamp(min=floor).to(total.dtype)
    return total / count.clamp(min=floor).to(total.dtype)
