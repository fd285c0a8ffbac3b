"""slurm/pretrain.sbatch against a real Slurm (munge, slurmctld, two slurmd) started on this machine:
a 2-node run trains and checkpoints; SIGUSR1 mid-run -> checkpoint -> requeue -> resume -> completion with
every step logged exactly once; the deepspeed launcher's per-node (--no_ssh) mode under srun.

Four jobs, five starts: where two tests read one job (a module fixture), each says so. Every start costs
seconds of each rank's imports; a tiny step a fraction of a second."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from localcluster import SLURM_PROGRAMS, missing, slurm_cluster
from tiny import PYTHON, ROOT, logged_steps, train_args
from tiny import write_micro_shards as write_shards

pytestmark = pytest.mark.slow
SBATCH = str(ROOT / "slurm" / "pretrain.sbatch")
JOB_ENV = {"MMPT_PYTHON": PYTHON, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    reason = missing(SLURM_PROGRAMS + ("mpirun",))
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as c:
        print(f"\nslurm cluster up in {c.startup_s:.1f} s")
        yield c


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def submit(cluster, out: Path, nodes: int, args: list[str], env: dict[str, str] | None = None) -> int:
    return cluster.sbatch([f"--nodes={nodes}", "--ntasks-per-node=1", f"--output={out}", f"--chdir={ROOT}",
                           SBATCH, *args], env={**JOB_ENV, **(env or {})})


def checkpoint_files(run: Path, step: int) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints" / f"global_step{step}").glob("*.pt"))


def _until_training(cluster, jid: int, run: Path, out: Path, steps: int = 2) -> None:
    deadline = time.monotonic() + 180
    while len(logged_steps(run)) < steps:  # mid-run: training is under way on both nodes
        assert time.monotonic() < deadline, out.read_text()[-3000:] if out.exists() else "no output"
        assert cluster.job(jid).get("JobState") in ("PENDING", "RUNNING"), out.read_text()[-3000:]
        time.sleep(0.2)


def _until_logged(out: Path, needle: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, f"no {needle!r} in {out}:\n" + out.read_text()[-3000:]
        time.sleep(0.2)


@dataclass
class Job:
    run: Path  # the job's run.dir
    log: str  # its output file, every start appended
    info: dict[str, str]  # `scontrol show job` at the end
    stopped_at: int  # the last step its first start logged
    requeued: dict[str, str] | None = None  # `scontrol show job` once the script requeued it (srun_job)
    latest_then: str = ""  # checkpoints/latest then (srun_job)
    diagnostics: str = ""


SRUN_STEPS = 5  # stopped at 3 (held after 2 until a rank got the signal), resumed for 4 and 5


@pytest.fixture(scope="module")
def srun_job(cluster, shards, tmp_path_factory) -> Job:
    """The default launcher (one srun task per rank) on 2 nodes, read by the next two tests: SIGUSR1 to the
    batch script while the ranks are held after step 2 (MMPT_FAULT_HOLD, released once a rank logged the
    signal, so the stop lands at step 3 however loaded the machine), requeue, then the requeued start
    resumes and completes SRUN_STEPS."""
    tmp = tmp_path_factory.mktemp("srun_job")
    run, out, release = tmp / "run", tmp / "job.out", tmp / "release"
    jid = submit(cluster, out, 2, train_args(shards, run, SRUN_STEPS, "logging.all_ranks=true"),  # rank 1's
                 env={"MMPT_FAULT_HOLD": f"2:{release}"})
    _until_training(cluster, jid, run, out)
    # what `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch script only
    cluster.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    _until_logged(out, "received SIGUSR1")  # a rank has it: every rank stops at the next stop check
    release.touch()
    requeued = cluster.wait_job(jid, {"PENDING"}, 120, str(out))  # requeued by the script; BeginTime ~2 min
    stopped_at = logged_steps(run)[-1]
    latest_then = (run / "checkpoints" / "latest").read_text().strip()
    # Skip the ~2 min BeginTime Slurm gives requeued jobs, but not within the second of the requeue:
    # slurmd refuses to relaunch a job whose credential it revoked in that same second.
    time.sleep(2)
    cluster.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"])
    info = cluster.wait_job(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 240, str(out))
    return Job(run, out.read_text(), info, stopped_at, requeued, latest_then, cluster.diagnostics(jid))


def test_two_node_job_trains_and_checkpoints(srun_job):
    """Reads srun_job: both of its starts ran 2 ranks on n1 and n2 from Slurm's variables."""
    run, log, info = srun_job.run, srun_job.log, srun_job.info
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    assert "rank 1 of 2 (from slurm variables), master 127.0.0.1" in log  # ranks from SLURM_PROCID et al.
    assert logged_steps(run) == list(range(1, SRUN_STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{SRUN_STEPS}"
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= \
        set(checkpoint_files(run, SRUN_STEPS))


def test_usr1_checkpoints_requeues_and_resumes_without_losing_or_repeating_a_step(srun_job):
    """Reads srun_job: USR1 -> checkpoint at the step it stopped -> requeue -> resume -> completion."""
    run, log, info, stopped_at = srun_job.run, srun_job.log, srun_job.info, srun_job.stopped_at
    assert srun_job.requeued["Restarts"] == "1", srun_job.requeued
    assert stopped_at == 3, log[-4000:]  # the first stop check after the signal
    assert srun_job.latest_then == f"global_step{stopped_at}"
    assert info["JobState"] == "COMPLETED", log[-4000:] + srun_job.diagnostics
    assert logged_steps(run) == list(range(1, SRUN_STEPS + 1)), log[-4000:]  # contiguous, none repeated
    assert "batch script got SIGUSR1" in log
    assert "training step exited with status 75" in log
    assert "requeueing job" in log
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert f"resumed from {run / 'checkpoints'}/global_step{stopped_at} at step {stopped_at}" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{SRUN_STEPS}"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (stopped_at, SRUN_STEPS)


@pytest.fixture(scope="module")
def ds_cancelled_job(cluster, shards, tmp_path_factory) -> Job:
    """MMPT_LAUNCHER=deepspeed on 2 nodes, read by the next two tests: scancel (SIGTERM to every process of
    the step) while the ranks are held after step 2 for 3 s past the signal (MMPT_FAULT_HOLD), like a slow
    step or save. data.workers=0: torch's DataLoader workers end on SIGTERM and take their rank down (a
    loader matter)."""
    tmp = tmp_path_factory.mktemp("ds_cancelled_job")
    run, out, release = tmp / "run", tmp / "job.out", tmp / "release"
    jid = submit(cluster, out, 2, train_args(shards, run, 400, "data.workers=0", "logging.all_ranks=true"),
                 env={"MMPT_LAUNCHER": "deepspeed", "TMPDIR": str(tmp),  # hostfiles go there
                      "MMPT_FAULT_HOLD": f"2:{release}"})
    _until_training(cluster, jid, run, out)
    cluster.run(["scancel", str(jid)])
    time.sleep(3)
    release.touch()
    info = cluster.wait_job(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 120, str(out))
    time.sleep(1)  # the job state can change before the last lines reach the output file
    steps = logged_steps(run)
    return Job(run, out.read_text(), info, steps[-1] if steps else 0)


def test_deepspeed_launcher_per_node_no_ssh_under_srun(ds_cancelled_job):
    """Reads ds_cancelled_job: one srun task per node runs `pretrain launch --launcher deepspeed --no-ssh`:
    hostfile written from SLURM_JOB_NODELIST, node rank from SLURM_NODEID, rank 0 at the first node's
    NodeAddr; both nodes' ranks train. Its run is cancelled: the end of a finished run is the srun
    launcher's (srun_job, the same script's exit) and `pretrain launch --launcher deepspeed`'s exit 0 that
    of tests/e2e/test_cross_site.py's sites."""
    run, log = ds_cancelled_job.run, ds_cancelled_job.log
    assert "--no_ssh --node_rank 0" in log and "--no_ssh --node_rank 1" in log, log[-4000:]
    assert "--master_addr 127.0.0.1" in log and "--hostfile" in log
    assert "rank 1 of 2 (from torch variables)" in log
    assert logged_steps(run) == [1, 2, 3]


def test_deepspeed_launcher_scancel_saves_before_the_step_ends(ds_cancelled_job):
    """Reads ds_cancelled_job. scancel signals SIGTERM to every process of the step: DeepSpeed's runner
    dies of it, `pretrain launch` (the srun task) waits for its per-node launcher and ranks, which save
    first; no requeue. The ranks are held after step 2 for 3 s past the signal: with the runner as the
    task, the step ended then and took the ranks with it."""
    run, log, info = ds_cancelled_job.run, ds_cancelled_job.log, ds_cancelled_job.info
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log[-4000:]
    assert ds_cancelled_job.stopped_at == 3, log[-4000:]  # the first stop check after the signal
    assert "stopped at step 3 on SIGTERM" in log, log[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"
    assert "requeueing" not in log


def test_deepspeed_launcher_usr1_still_checkpoints_and_requeues(cluster, shards, tmp_path):
    """MMPT_LAUNCHER=deepspeed: the srun task is `pretrain launch`, the parent of DeepSpeed's runner, which
    starts MMPT_PROCS_PER_NODE ranks (srun gets MMPT_SRUN_ARGS); USR1 reaches every process of the step,
    the launcher processes ignore it, the ranks save and exit 75, and the script requeues."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    jid = submit(cluster, out, 1, train_args(shards, run, 400, "logging.all_ranks=true"),
                 env={"MMPT_LAUNCHER": "deepspeed", "MMPT_PROCS_PER_NODE": "2", "MMPT_SRUN_ARGS": "--label"})
    _until_training(cluster, jid, run, out)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    info = cluster.wait_job(jid, {"PENDING"}, 120, str(out))  # requeued by the script
    cluster.run(["scancel", str(jid)])
    log = out.read_text()
    assert info["Restarts"] == "1", log[-4000:]
    stopped_at = logged_steps(run)[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped_at}"
    assert "training step exited with status 75" in log and "requeueing job" in log
    assert "--num_accelerators 2" in log and "rank 1 of 2 (from torch variables)" in log
    assert "\n0: " in log  # srun --label: MMPT_SRUN_ARGS reached srun


def test_torchrun_launcher_per_node_trains_and_usr1_requeues(cluster, shards, tmp_path):
    """MMPT_LAUNCHER=torchrun: one srun task per node runs `pretrain launch --launcher torchrun` (node rank
    from SLURM_NODEID, rank 0 at the first node's address). On USR1 the ranks save and exit 75, which torchrun
    reports as 1: the script requeues anyway because USR1 came and the step did not finish."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    jid = submit(cluster, out, 2, train_args(shards, run, 400, "logging.all_ranks=true"),
                 env={"MMPT_LAUNCHER": "torchrun"})
    _until_training(cluster, jid, run, out)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    info = cluster.wait_job(jid, {"PENDING"}, 120, str(out))  # requeued by the script
    cluster.run(["scancel", str(jid)])
    log = out.read_text()
    assert info["Restarts"] == "1", log[-4000:]
    assert "torch.distributed.run --nnodes 2 --nproc_per_node 1 --node_rank 0" in log, log[-4000:]
    assert "--node_rank 1" in log and "--master_addr 127.0.0.1" in log
    assert "rank 1 of 2 (from torch variables)" in log
    stopped_at = logged_steps(run)[-1]
    assert stopped_at < 400
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped_at}"
    assert "batch script got SIGUSR1" in log and "requeueing job" in log
