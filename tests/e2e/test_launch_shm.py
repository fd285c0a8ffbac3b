"""DeepSpeed's CPU shared-memory allreduce names one ~69 MB /dev/shm segment per rank and never removes
it; the rendezvous unlinks each rank's name once all ranks mapped it, so runs leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny import run_pretrain, train_args, write_micro_shards

pytestmark = pytest.mark.slow
SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
@pytest.mark.timeout(600)
def test_two_rank_run_leaves_no_shared_memory_segments(tmp_path):
    shards = write_micro_shards(tmp_path / "data")
    before = {p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}
    r = run_pretrain(["train", *train_args(shards, tmp_path / "run", 2)], procs=2, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    left = {p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} - before
    assert not left, f"leaked /dev/shm segments: {sorted(left)}"
