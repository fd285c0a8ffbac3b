"""docs/launch.md: "a second process with the same rank is named too". Three processes for a world of 3,
started as ranks 0, 1 and 1: the second rank 1 to join is told at once (exit 2) that another process already
joined as rank 1, and the two others end within `parallel.timeout_s` saying that two processes were started
as rank 1, never a hang or a bare timeout."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tiny import PYTHON, ROOT, train_args
from tiny import write_micro_shards as write_shards

from launch.rendezvous import free_port

pytestmark = pytest.mark.slow
TIMEOUT_S = 20
"""Long enough for the three interpreters to reach the rendezvous on a loaded 2-core machine: the duplicate
must join before the others give up."""


def _start(rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI_", "PMI", "RANK"))}
    env.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    with open(log, "w") as fh:
        return subprocess.Popen([PYTHON, "-m", "pretrain.cli", "train", *args], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)


def test_a_second_process_with_the_same_rank_is_named(tmp_path: Path):
    shards = write_shards(tmp_path / "shards")
    port = free_port()
    args = train_args(shards, tmp_path / "run", 3, f"parallel.timeout_s={TIMEOUT_S}")
    logs = [tmp_path / name for name in ("rank0.log", "rank1a.log", "rank1b.log")]
    procs = [_start(rank, port, args, log) for rank, log in zip((0, 1, 1), logs)]
    try:
        codes = [p.wait(timeout=TIMEOUT_S + 150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    tails = [t[-2000:] for t in texts]
    named = [i for i in (1, 2) if "another process already joined as rank 1; each rank needs its own RANK "
             "value" in texts[i]]
    assert len(named) == 1, tails  # exactly one of the two rank-1 processes joined second
    dup, other = named[0], 3 - named[0]
    assert codes[dup] == 2, tails  # a user mistake: exit 2 at once, not after the timeout
    for i in (0, other):  # the two that joined wait out the timeout, then say why the group did not form
        assert codes[i] == 1, tails
        assert "two processes were started as rank 1" in texts[i], tails[i]
        assert "2 of 3 ranks joined" in texts[i], tails[i]
    assert not any("Traceback" in t for t in texts), tails
