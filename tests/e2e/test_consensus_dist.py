"""`parallel.consensus.on_rank0` over 2 gloo ranks with a 3-second collective timeout: work on rank 0 that
takes longer than the timeout (a universal conversion at resume) finishes with the other rank still waiting,
and its result or exception comes back on rank 0 only; the control shows that one collective held open for
the same time does time out."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.consensus import failures_by_rank, on_rank0

pytestmark = [pytest.mark.slow, pytest.mark.dist]
WORLD, TIMEOUT_S, WORK_S = 2, 3, 6  # polls every 0.5 s: far inside the timeout


def _slow(value: str) -> str:
    time.sleep(WORK_S)
    if value == "fail":
        raise OSError("disk full")
    return value


def _worker(rank: int, init_file: str, out_dir: str, held_open: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    out: dict = {}
    try:
        if held_open:  # the control: rank 1 waits inside one collective while rank 0 works
            try:
                if rank == 0:
                    _slow("x")
                failures_by_rank(None)
                out["held"] = "ok"
            except Exception as e:
                out["held"] = type(e).__name__
        else:
            out["ok"] = on_rank0(lambda: _slow("converted"))
            result, error = on_rank0(lambda: _slow("fail"))
            out["fail"] = (result, None if error is None else str(error))
            out["after"] = failures_by_rank(error)  # every rank hears of rank 0's failure
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        if not held_open:
            dist.destroy_process_group()
        else:  # a gloo group whose collective timed out can abort (SIGABRT) in its destructor at exit:
            os._exit(0)  # the result is saved; leave without running that teardown


@pytest.mark.timeout(120)
def test_rank0_work_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), False), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["ok"] == ("converted", None) and r1["ok"] == (None, None)
    assert r0["fail"] == (None, "disk full") and r1["fail"] == (None, None)
    assert r0["after"] == r1["after"] == ["rank 0: disk full"]


@pytest.mark.timeout(120)
def test_control_one_collective_held_open_times_out(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), True), nprocs=WORLD, join=False).join(60)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r1["held"] != "ok", "the waiting rank's collective should have timed out"
