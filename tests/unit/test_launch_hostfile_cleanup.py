"""`pretrain launch --launcher deepspeed` inside a Slurm allocation writes a hostfile from SLURM_JOB_NODELIST
(docs/launch.md) into $TMPDIR; it is removed when `pretrain launch` ends, so starts, requeues and dry runs do
not leave `mmpt-hostfile-JOBID-*` files behind."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
         "SLURM_JOB_NODELIST": "gpu[07-08]"}
ARGS = ["launch", "--launcher", "deepspeed", "--procs-per-node", "2", "--no-ssh", "--", "train",
        "train.steps=1"]


def _env(tmp: Path, path: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_", "OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE")}
    return {**keep, **SLURM, "TMPDIR": str(tmp), "PATH": path}


def _launch(tmp: Path, extra: list[str], path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *ARGS[:1], *extra, *ARGS[1:]], cwd=ROOT,
                          env=_env(tmp, path), capture_output=True, text=True, timeout=120)


def test_dry_run_leaves_no_hostfile(tmp_path: Path):
    r = _launch(tmp_path, ["--dry-run"], os.environ["PATH"])
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip())
    assert Path(cmd[cmd.index("--hostfile") + 1]).parent == tmp_path  # written there ...
    assert list(tmp_path.glob("mmpt-hostfile-*")) == []  # ... and gone once launch ended
    assert "slots=" in r.stderr.split("holds:", 1)[1]  # so the dry run shows what it held


def test_launch_removes_its_hostfile_when_the_runner_exits(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deepspeed"  # a runner that shows the hostfile it was given, then fails
    fake.write_text('#!/bin/sh\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --hostfile ] && cat "$2"; shift; done\nexit 3\n')
    fake.chmod(0o755)
    r = _launch(tmp_path, ["--python", str(bin_dir / "python")], f"{bin_dir}:/usr/bin:/bin")  # runs bin's
    assert r.returncode == 3, r.stderr
    assert r.stdout == "gpu07 slots=2\ngpu08 slots=2\n"  # it existed while the runner ran
    assert list(tmp_path.glob("mmpt-hostfile-*")) == []


def test_a_launch_refused_after_writing_it_removes_it(tmp_path: Path):
    nowhere = str(tmp_path / "empty")  # no deepspeed beside --python nor on PATH: refused, exit 2
    r = _launch(tmp_path, ["--python", f"{nowhere}/python"], nowhere)
    assert r.returncode == 2 and "deepspeed: no such program" in r.stderr, r.stderr
    assert list(tmp_path.glob("mmpt-hostfile-*")) == []
