"""Open MPI's mpirun with mpi4py: `pretrain launch --launcher mpirun` trains on 2 ranks that find each other
through OMPI_COMM_WORLD_* plus an MPI broadcast of rank 0's port, and ranks whose launcher variables are
unknown fall back to asking MPI itself."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from localcluster import missing
from tiny import PYTHON, ROOT, logged_steps, train_args
from tiny import write_micro_shards as write_shards

pytestmark = pytest.mark.slow
LOCAL_ONLY = "--oversubscribe --mca btl self,vader,tcp --mca oob_tcp_if_include lo"


@pytest.fixture(scope="module", autouse=True)
def _mpi_available():
    reason = missing(["mpirun"], need_root=False)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        reason = reason or "mpi4py is not installed (pip install mmpt[mpi])"
    if reason:
        pytest.skip(reason)


def test_mpirun_two_ranks_train(tmp_path):
    shards = write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    r = subprocess.run([PYTHON, "-m", "pretrain.cli", "launch", "--launcher", "mpirun", "--nodes", "1",
                        "--procs-per-node", "2", f"--launcher-args={LOCAL_ONLY}", "--",
                        "train", *train_args(shards, run, 3, "logging.all_ranks=true")],  # rank 1's line
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "mpirun -np 2 --npernode 2 --allow-run-as-root --bind-to none" in out or os.geteuid() != 0
    assert "rank 1 of 2 (from openmpi variables)" in out
    assert logged_steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"


HIDE_OMPI = [a for v in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                         "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_NODE_RANK") for a in ("-u", v)]
"""`env` arguments that strip Open MPI's rank variables: an MPI launcher `discover` does not know."""

PROBE = """
import json
import re
from launch.rendezvous import resolve
info = resolve()
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank,
                  "source": info.source, "addr": info.master_addr, "port": info.master_port}), flush=True)
"""


def test_unknown_mpi_launcher_falls_back_to_mpi4py():
    """Strip Open MPI's rank variables: ranks are then found through mpi4py (MPI_COMM_WORLD), and rank 0's
    free port reaches the other rank by broadcast."""
    r = subprocess.run(["mpirun", "-np", "2", "--allow-run-as-root", *LOCAL_ONLY.split(), "env", *HIDE_OMPI,
                        PYTHON, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Both ranks write to one pipe: lines can interleave, so pick every JSON object out of the stream.
    rows = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)), key=lambda d: d["rank"])
    assert [d["rank"] for d in rows] == [0, 1]
    assert {d["source"] for d in rows} == {"mpi4py"}
    assert {d["world"] for d in rows} == {2} and [d["local"] for d in rows] == [0, 1]
    assert len({(d["addr"], d["port"]) for d in rows}) == 1 and rows[0]["addr"] == "127.0.0.1"


def test_training_under_the_mpi4py_fallback_checks_the_config_at_mpi_world_size(tmp_path):
    """The same fallback through `pretrain train`: keys that depend on the world size are checked against
    MPI's 2 ranks, not 1 (train.global_batch = 4 per rank x 2), and only rank 0 logs INFO lines."""
    shards = write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    r = subprocess.run(["mpirun", "-np", "2", "--allow-run-as-root", *LOCAL_ONLY.split(), "env", *HIDE_OMPI,
                        "OMP_NUM_THREADS=1", PYTHON, "-m", "pretrain.cli", "train",
                        *train_args(shards, run, 2, "train.global_batch=8")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert logged_steps(run) == [1, 2]
    assert "rank 0 of 2 (from mpi4py variables)" in out
    assert "rank 1 of 2" not in out  # rank 1 logs warnings and errors only
