"""The test Slurm cluster (tests/localcluster.py) takes its jobs' processes down with it: slurmstepd detaches
them from the daemons, so a job that hung (a failed test, a mutation under test) outlived its test and held
its ports (29500...) while later Slurm tests ran."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from localcluster import SLURM_PROGRAMS, missing, slurm_cluster

pytestmark = pytest.mark.slow


def _pids(tag: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if int(p) != os.getpid()]


def test_stopping_the_cluster_ends_a_running_jobs_processes():
    reason = missing(SLURM_PROGRAMS)
    if reason:
        pytest.skip(reason)
    tag = f"sleep 61{os.getpid() % 1000:03d}"  # one this test alone runs
    with slurm_cluster() as c:
        script = c.root / "job.sh"
        script.write_text(f"#!/bin/bash\nsrun -N2 -n2 {tag}\n")
        script.chmod(0o755)
        c.sbatch(["-N2", f"--output={c.root}/job.out", str(script)])
        deadline = time.monotonic() + 60
        out = c.root / "job.out"
        while len(_pids(tag)) < 3:  # srun and its task on each node
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "the job never started"
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _pids(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _pids(tag)
    for pid in left:  # do not leave them to the next test either way
        os.kill(pid, 9)
    assert not left, f"job processes outlived the cluster: {left}"
