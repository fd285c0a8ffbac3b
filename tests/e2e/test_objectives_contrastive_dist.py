"""The local contrastive loss over 2 gloo ranks reproduces the single-process full-batch loss and,
after DeepSpeed's gradient averaging, its gradients.

Why the relations below hold: let L be the full-batch loss and L_r rank r's local loss (its B/2 rows
against all B columns). Then L = mean_r L_r. The backward of `all_gather_with_grad` sums over ranks, so
a per-sample tensor on rank r (its features, its inputs) receives sum_s dL_s/dx_r = world * dL/dx_r,
while a shared parameter's per-rank gradients average (as DeepSpeed does) to dL/dparam.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.objectives import contrastive_loss

pytestmark = [pytest.mark.slow, pytest.mark.dist]

WORLD, B, D, E = 2, 8, 12, 16  # global batch B, split evenly over WORLD ranks


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"x_img": torch.randn(B, D, generator=gen),  # image inputs, projected by a shared weight
            "proj": torch.randn(D, E, generator=gen) / D ** 0.5,  # a "model parameter" on every rank
            "txt": torch.randn(B, E, generator=gen),  # text features, leaves
            "log_scale": torch.tensor(2.0)}


def _loss_and_grads(data: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    x_img = data["x_img"][rows].clone().requires_grad_()
    txt = data["txt"][rows].clone().requires_grad_()
    proj = data["proj"].clone().requires_grad_()
    log_scale = data["log_scale"].clone().requires_grad_()
    loss = contrastive_loss(x_img @ proj, txt, log_scale.exp())
    loss.backward()
    return {"loss": loss.detach(), "x_img": x_img.grad, "txt": txt.grad, "proj": proj.grad,
            "log_scale": log_scale.grad}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        n = B // WORLD
        result = _loss_and_grads(_data(), slice(rank * n, (rank + 1) * n))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_local_loss_over_ranks_equals_full_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    full = _loss_and_grads(_data(), slice(None))  # this process is not distributed: plain CLIP loss
    n = B // WORLD
    tol = {"rtol": 0, "atol": 1e-6}

    # the loss DeepSpeed logs (mean over ranks) is the full-batch loss
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), full["loss"], **tol)
    for r, res in enumerate(ranks):
        rows = slice(r * n, (r + 1) * n)
        # per-sample tensors: the gather's summed backward gives world x the full-batch gradient
        torch.testing.assert_close(res["txt"] / WORLD, full["txt"][rows], **tol)
        torch.testing.assert_close(res["x_img"] / WORLD, full["x_img"][rows], **tol)
        # (so the rows are not merely this rank's share of the gradient, which is what a gather
        # without gradient would give)
        assert not torch.allclose(res["txt"], full["txt"][rows], atol=1e-4)
    # shared parameters: DeepSpeed's average over dp ranks is exactly the full-batch gradient
    for name in ("proj", "log_scale"):
        avg = torch.stack([r[name] for r in ranks]).mean(dim=0)
        torch.testing.assert_close(avg, full[name], **tol)
        assert not torch.allclose(ranks[0][name], full[name], atol=1e-4)
