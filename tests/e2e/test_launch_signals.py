"""Stop signals under `pretrain launch --launcher deepspeed` (real launcher, 2 CPU ranks, a micro model):
SIGTERM or SIGUSR1 to the `pretrain launch` process alone (Kubernetes, systemd, `kill PID`) reaches the
ranks, which save a checkpoint and exit 75, and so does `pretrain launch`; a signal to every process at
once (Slurm's scancel, `kill -- -PGID`) still ends in a saved checkpoint, with `pretrain launch` alive
until the last rank is gone (under Slurm the step, and its ranks, end when it does)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny import PYTHON, ROOT, logged_steps, train_args
from tiny import write_micro_shards as write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _launch_and_signal(shards: str, run: Path, sig: signal.Signals, to_group: bool,
                       *extra: str) -> tuple[int, str, bool]:
    """Start a long run, send `sig` once step 1 is logged (every rank is training then), and return the
    exit status of `pretrain launch`, its output, and whether any process of the job outlived it."""
    cmd = [PYTHON, "-m", "pretrain.cli", "launch", "--launcher", "deepspeed", "--procs-per-node", "2", "--",
           "train", *train_args(shards, run, 10_000, *extra)]
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as fh:  # own session: its process group is the whole job
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or not logged_steps(run):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        status = proc.wait(timeout=180)
        outlived = _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return status, log.read_text(), outlived


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_pretrain_launch_alone_checkpoints_and_exits_75(shards, tmp_path, sig):
    run = tmp_path / "run"
    status, out, outlived = _launch_and_signal(shards, run, sig, to_group=False)
    assert status == 75, out[-4000:]
    assert f"got {sig.name}; passed it to 2 rank(s)" in out
    stopped = logged_steps(run)[-1]
    assert f"stopped at step {stopped} on {sig.name}" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped}"
    assert not outlived, "a rank or launcher process outlived `pretrain launch`"


def test_sigterm_to_every_process_checkpoints_before_pretrain_launch_exits(shards, tmp_path):
    """What Slurm does on scancel: the runner dies of it at once; `pretrain launch` adopts DeepSpeed's
    per-node launcher and waits for it and its ranks, which save first. That launcher reports its own
    SIGTERM as 1 (as torchrun does), so the status is 1, not 75.

    data.workers=1: the DataLoader worker gets the SIGTERM too, and must keep serving until its rank has
    saved (torch's own handler ends it, and the rank then raises instead of saving)."""
    run = tmp_path / "run"
    status, out, outlived = _launch_and_signal(shards, run, signal.SIGTERM, True, "data.workers=1")
    assert status == 1, out[-4000:]
    assert "waiting for its ranks to finish" in out
    stopped = logged_steps(run)[-1]
    assert f"stopped at step {stopped} on SIGTERM" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped}"
    assert not outlived, "a rank or launcher process outlived `pretrain launch`"
