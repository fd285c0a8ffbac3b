"""Tiled (chunked) InfoNCE and SigLIP: same loss and gradients as the plain losses, which hold the whole
logit matrix; over 2 gloo ranks the tiled local loss reproduces the single-process full batch; the joint
model trains with every option.

The multi-process and end-to-end tests; the fast single-process ones are in
tests/unit/test_objectives_chunked.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.objectives import contrastive_loss


def _inputs(b: int, e: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, e, generator=gen, dtype=dtype), torch.randn(b, e, generator=gen, dtype=dtype),
            torch.tensor(14.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)]


# ---------------------------------------------------------------------------------- joint model


# ------------------------------------------------------------------------------- 2 gloo ranks
WORLD, GB, E = 2, 10, 12  # global batch GB over WORLD ranks (5 rows each: not a multiple of chunk)


def _dist_loss(rows: slice, loss: str, chunk: int) -> dict[str, torch.Tensor]:
    inputs = _inputs(GB, E, torch.float64, seed=7)
    img, txt = inputs[0][rows].clone().requires_grad_(), inputs[1][rows].clone().requires_grad_()
    scale, bias = inputs[2].clone().requires_grad_(), inputs[3].clone().requires_grad_()
    out = contrastive_loss(img, txt, scale, loss=loss, chunk=chunk,
                           logit_bias=bias if loss == "siglip" else None)
    out.backward()
    return {"loss": out.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad,
            "bias": bias.grad if loss == "siglip" else torch.zeros(())}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        n = GB // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        res = {f"{loss}": _dist_loss(rows, loss, 3) for loss in ("infonce", "siglip")}
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(180)
def test_tiled_local_loss_over_ranks_equals_full_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    n, tol = GB // WORLD, {"rtol": 0, "atol": 1e-10}
    for loss in ("infonce", "siglip"):
        full = _dist_loss(slice(None), loss, 0)  # not distributed: the plain full-batch loss
        per = [r[loss] for r in ranks]
        torch.testing.assert_close(torch.stack([p["loss"] for p in per]).mean(), full["loss"], **tol)
        for r, res in enumerate(per):
            rows = slice(r * n, (r + 1) * n)
            # per-sample tensors get world x the full-batch gradient (the gather's summed backward)
            torch.testing.assert_close(res["img"] / WORLD, full["img"][rows], **tol)
            torch.testing.assert_close(res["txt"] / WORLD, full["txt"][rows], **tol)
        for name in ("scale", "bias"):  # shared parameters: the dp average is the full-batch gradient
            torch.testing.assert_close(torch.stack([p[name] for p in per]).mean(), full[name], **tol)
