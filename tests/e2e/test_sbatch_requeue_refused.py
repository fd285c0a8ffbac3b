"""slurm/pretrain.sbatch's own logic on a real Slurm (tests/localcluster.py), with a stand-in python that
only reports what it was started with, so each job takes seconds: a requeue Slurm refuses ends the job
FAILED 75 (never COMPLETED 0, which would let `afterok` successors start on an unfinished run); the
torchrun/deepspeed branch starts exactly one `pretrain launch` per node whatever --ntasks-per-node the job
was given, and passes --procs-per-node only when MMPT_PROCS_PER_NODE is set."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from localcluster import SLURM_PROGRAMS, missing, slurm_cluster
from tiny import ROOT

pytestmark = pytest.mark.slow
SBATCH = str(ROOT / "slurm" / "pretrain.sbatch")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
# what the script runs as "$PYTHON": one line per Slurm task, then the exit status the test asks for
FAKE_PYTHON = """#!/bin/bash
echo "task PROCID=$SLURM_PROCID NODE=$SLURMD_NODENAME STEP_TASKS=$SLURM_STEP_NUM_TASKS argv: $*"
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture(scope="module")
def cluster():
    reason = missing(SLURM_PROGRAMS)
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as c:
        print(f"\nslurm cluster up in {c.startup_s:.1f} s")
        yield c


def fake_job(cluster, tmp_path: Path, name: str, sbatch_args: list[str], env: dict[str, str]):
    """Submit pretrain.sbatch with the stand-in python; wait for the end; (job record, output)."""
    fake = tmp_path / "fakepy"
    if not fake.exists():
        fake.write_text(FAKE_PYTHON)
        fake.chmod(0o755)
    out = tmp_path / f"{name}.out"
    argv = [*sbatch_args, f"--output={out}", f"--chdir={tmp_path}", SBATCH, "--config", "c.yaml"]
    jid = cluster.sbatch(argv, env={"MMPT_PYTHON": str(fake), **env})
    info = cluster.wait_job(jid, ENDED, 60, str(out))
    time.sleep(0.5)  # the job state can change before the last lines reach the output file
    return jid, info, out.read_text()


def test_refused_requeue_ends_failed_75_not_completed(cluster, tmp_path):
    """Ranks stopped with 75 (checkpoint saved) in a job submitted with --no-requeue: `scontrol requeue`
    is refused, so the script says so and exits 75 itself."""
    t0 = time.monotonic()
    jid, info, log = fake_job(cluster, tmp_path, "norequeue", ["--nodes=1", "--no-requeue"],
                              {"FAKE_EXIT": "75"})
    assert "training step exited with status 75" in log, log
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log)
    assert info["Restarts"] == "0"
    assert f"requeue of job {jid} refused" in log and "resubmit the same command" in log, log
    print(f"refused requeue: {time.monotonic() - t0:.1f} s")


TASK_LINE = re.compile(r"^task PROCID=(\d+) NODE=(\S+) STEP_TASKS=(\d+) argv: (.*)$", re.M)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_per_node_launchers_start_one_launch_per_node(cluster, tmp_path, launcher):
    """`sbatch -N2 --ntasks-per-node=2` (the natural GPU submission): the job's SLURM_NTASKS=4 must not
    make srun start two `pretrain launch` per node (same node rank twice, one master port)."""
    t0 = time.monotonic()
    # torchrun without MMPT_PROCS_PER_NODE (empty counts as unset): `pretrain launch` picks the rank count
    procs = {"torchrun": "", "deepspeed": "3"}[launcher]
    _, info, log = fake_job(cluster, tmp_path, launcher, ["--nodes=2", "--ntasks-per-node=2"],
                            {"MMPT_LAUNCHER": launcher, "MMPT_PROCS_PER_NODE": procs})
    assert info["JobState"] == "COMPLETED", (info, log)
    tasks = TASK_LINE.findall(log)
    assert sorted((p, n, t) for p, n, t, _ in tasks) == [("0", "n1", "2"), ("1", "n2", "2")], log
    want = f"-m pretrain.cli launch --launcher {launcher} --nodes 2"
    want += {"torchrun": "", "deepspeed": " --procs-per-node 3 --no-ssh"}[launcher]
    want += " -- train --resume latest --config c.yaml"
    assert all(a == want for *_, a in tasks), (want, log)
    print(f"{launcher} per node: {time.monotonic() - t0:.1f} s")
