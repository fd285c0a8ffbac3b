"""The ranks of one site act together: an error of any kind on one rank inside `every_rank` fails every rank
at once (two real gloo processes), instead of leaving the others in the next collective until timeout."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, init: str, out: str) -> None:
    from parallel.cross_site_join import every_rank

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    loop = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(site="a", rendezvous="h:1"))

    def work() -> int:
        if rank == 1:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a store value that is not text")
        return 1

    try:
        every_rank(work, loop)  # type: ignore[arg-type]
        what = "returned"
    except Exception as e:
        what = f"{type(e).__name__}: {e}"
    try:  # what a rank left behind would meet: the next collective of the site
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(what)


def test_a_non_cross_site_error_on_one_rank_fails_every_rank_together(tmp_path):
    t0 = time.monotonic()
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "rank1.txt").read_text().startswith("UnicodeDecodeError")
    other = (tmp_path / "rank0.txt").read_text()
    assert other.startswith("CrossSiteError: cross-site: another rank of site a")
