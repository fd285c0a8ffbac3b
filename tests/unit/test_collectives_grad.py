"""`all_gather_with_grad`'s backward on two gloo ranks: each rank gets the sum over ranks of the gradient
of its own rows, and the incoming gradient is left as it was. Autograd may hand one gradient tensor to
several branches (an add passes its output's gradient to both inputs); an in-place all_reduce on it gave
the other branch the sum over ranks instead of its own gradient."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.collectives import all_gather_with_grad


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        w = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
        # the other branch first: autograd runs the later-made gather's backward before it, so an in-place
        # reduce there would reach this branch
        other = w * 2.0
        gathered, offset = all_gather_with_grad(x)  # [4, 3]
        z = other + gathered  # the add hands one gradient tensor to both branches
        weights = torch.arange(12, dtype=torch.float64).reshape(4, 3) * (rank + 1)
        (z * weights).sum().backward()
        result = {"offset": offset, "gathered": gathered.detach().tolist(), "w": w.grad.tolist(),
                  "x": x.grad.tolist()}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_the_gathered_gradient_is_summed_over_ranks_and_the_other_branch_keeps_its_own(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    base = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["offset"] == 2 * rank
        assert got["gathered"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        # d/dw of sum(2 w * weights): this rank's own weights, untouched by the other rank
        assert got["w"] == (2.0 * base * (rank + 1)).tolist(), rank
        # d/dx: the weights of this rank's rows, summed over both ranks (1x + 2x)
        assert got["x"] == (3.0 * base[2 * rank:2 * rank + 2]).tolist(), rank
