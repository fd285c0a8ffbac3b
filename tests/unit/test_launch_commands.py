"""`pretrain launch --dry-run`: the exact command of each launcher, with defaults from a Slurm allocation."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from launchargs import plan

from launch import cli as launch_cli
from launch.commands import LaunchPlan, LaunchPlanError, build_command
from launch.hostfile import read_hostfile

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TRAIN = ("train", "--config", "c.yaml", "train.steps=9")



def test_deepspeed_single_node():
    p = plan(["--launcher", "deepspeed", "--procs-per-node", "2", "--master-port", "4000", "--python", PY,
              "--", *TRAIN])
    assert build_command(p) == [str(Path(PY).parent / "deepspeed"), "--num_accelerators", "2",
                                "--master_port", "4000", "--no_local_rank", "--module", "pretrain.cli",
                                *TRAIN]


def test_deepspeed_hostfile_from_slurm_nodelist_and_no_ssh_node_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where write_hostfile puts it
    monkeypatch.setattr(launch_cli, "node_address", lambda n: {"n1": "10.1.0.1"}.get(n, n))
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}  # `srun --ntasks-per-node=1 pretrain launch ...`
    p = plan(["--launcher", "deepspeed", "--procs-per-node", "4", "--no-ssh", "--python", PY, "--", *TRAIN],
             env)
    cmd = build_command(p)
    hostfile = cmd[cmd.index("--hostfile") + 1]
    assert hostfile.startswith(str(tmp_path))
    assert read_hostfile(hostfile) == [("n1", 4), ("n2", 4)]
    assert cmd[cmd.index("--hostfile") + 2:] == [
        "--num_nodes", "2", "--num_accelerators", "4", "--master_addr", "10.1.0.1", "--master_port",
        str(29500 + 77), "--no_ssh", "--node_rank", "1", "--no_local_rank", "--module", "pretrain.cli",
        *TRAIN]


def test_torchrun_per_node():
    p = plan(["--launcher", "torchrun", "--nodes", "2", "--procs-per-node", "8", "--node-rank", "1",
              "--master-addr", "10.0.0.1", "--master-port", "29400", "--python", PY, "--", *TRAIN])
    assert build_command(p) == [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
                                "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400",
                                "-m", "pretrain.cli", *TRAIN]


def test_torchrun_several_nodes_needs_a_node_rank():
    with pytest.raises(LaunchPlanError, match="node-rank"):
        plan(["--launcher", "torchrun", "--nodes", "2", "--master-addr", "h", "--", *TRAIN])


def test_torchrun_in_a_batch_script_is_refused_not_started_on_one_node():
    """Slurm sets SLURM_NODEID=0 in the batch script too (no step): it was taken as node rank 0 of 2, so
    torchrun started on the batch host alone and waited for a node nobody started."""
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_NODEID": "0"}
    with pytest.raises(LaunchPlanError, match="outside a job step.*srun --ntasks-per-node=1"):
        plan(["--launcher", "torchrun", "--procs-per-node", "2", "--master-addr", "n1", "--", *TRAIN], env)
    p = plan(["--launcher", "torchrun", "--procs-per-node", "2", "--master-addr", "n1", "--", *TRAIN],
             {**env, "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"})  # in a step: its node rank
    assert p.node_rank == 1 and p.nodes == 2


def test_a_step_smaller_than_the_allocation_sets_the_node_count():
    """`salloc -N4; srun -N2 --ntasks-per-node=1 pretrain launch ...`: 2 nodes, not the job's 4 (torchrun
    waited for two nodes that never joined)."""
    env = {"SLURM_JOB_ID": "6", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "n[1-4]",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[3-4]",
           "SLURM_NODEID": "1"}
    p = plan(["--launcher", "torchrun", "--procs-per-node", "4", "--master-addr", "n3", "--", *TRAIN], env)
    assert (p.nodes, p.node_rank) == (2, 1)
    cmd = build_command(p)
    assert cmd[cmd.index("--nnodes") + 1] == "2"


def _two_host_file(tmp_path: Path, monkeypatch) -> None:
    """`hf` in the working directory: `pretrain launch` reads a --hostfile before building the command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").write_text("h0 slots=3\nh1 slots=3\n")


def test_mpirun_open_mpi_leaves_the_master_to_mpi4py_unless_given(monkeypatch, tmp_path):
    monkeypatch.setattr(launch_cli.os, "geteuid", lambda: 0)
    _two_host_file(tmp_path, monkeypatch)
    env = {"MMPT_MPI_FLAVOR": "openmpi"}
    p = plan(["--launcher", "mpirun", "--nodes", "1", "--procs-per-node", "2", "--python", PY,
              "--launcher-args=--oversubscribe --mca btl self,vader,tcp", "--", *TRAIN], env)
    assert build_command(p) == ["mpirun", "-np", "2", "--npernode", "2", "--allow-run-as-root", "--bind-to",
                                "none", "--oversubscribe", "--mca", "btl", "self,vader,tcp", PY, "-m",
                                "pretrain.cli", *TRAIN]
    p = plan(["--launcher", "mpirun", "--nodes", "2", "--procs-per-node", "2", "--hostfile", "hf",
              "--master-addr", "h0", "--master-port", "5000", "--python", PY, "--", *TRAIN], env)
    assert build_command(p)[:14] == ["mpirun", "-np", "4", "--npernode", "2", "--allow-run-as-root",
                                     "--bind-to", "none", "--hostfile", "hf", "-x", "MASTER_ADDR=h0", "-x",
                                     "MASTER_PORT=5000"]
    p = plan(["--launcher", "mpirun", "--launcher-args=--bind-to core", "--", *TRAIN], env)
    assert build_command(p).count("--bind-to") == 1  # the user's choice wins


def test_mpirun_mpich_spelling(monkeypatch, tmp_path):
    _two_host_file(tmp_path, monkeypatch)
    p = plan(["--launcher", "mpirun", "--nodes", "2", "--procs-per-node", "3", "--hostfile", "hf",
              "--master-addr", "h0", "--master-port", "5000", "--python", PY, "--", *TRAIN],
             {"MMPT_MPI_FLAVOR": "mpich"})
    assert build_command(p)[:13] == ["mpirun", "-n", "6", "-ppn", "3", "-f", "hf", "-genv", "MASTER_ADDR",
                                     "h0", "-genv", "MASTER_PORT", "5000"]


def test_srun_one_task_per_rank():
    p = plan(["--launcher", "srun", "--nodes", "2", "--procs-per-node", "4", "--master-addr", "10.0.0.9",
              "--master-port", "6000", "--python", PY, "--", *TRAIN])
    assert build_command(p) == ["srun", "--nodes", "2", "--ntasks-per-node", "4", "--ntasks", "8",
                                "--kill-on-bad-exit=1", "--export=ALL,MASTER_ADDR=10.0.0.9,MASTER_PORT=6000",
                                PY, "-m", "pretrain.cli", *TRAIN]


@pytest.mark.parametrize("argv, words", [
    (["--launcher", "deepspeed", "--nodes", "2", "--master-addr", "h", "--"] + list(TRAIN), "hostfile"),
    (["--launcher", "srun", "--nodes", "3", "--"] + list(TRAIN), "--master-addr"),
    (["--launcher", "srun", "--no-ssh", "--"] + list(TRAIN), "deepspeed launcher mode"),
    (["--launcher", "srun"], "nothing to launch"),
    (["--launcher", "srun", "--", "--config", "x"], "subcommand"),
])
def test_impossible_requests_are_refused(argv, words):
    with pytest.raises(LaunchPlanError, match=words):
        build_command(plan(argv))


def test_dry_run_through_the_pretrain_cli_prints_one_runnable_line():
    r = subprocess.run([PY, "-m", "pretrain.cli", "launch", "--launcher", "torchrun", "--procs-per-node", "2",
                        "--master-port", "29999", "--dry-run", "--", *TRAIN], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip()) == [PY, "-m", "torch.distributed.run", "--nnodes", "1",
                                             "--nproc_per_node", "2", "--node_rank", "0", "--master_addr",
                                             "127.0.0.1", "--master_port", "29999", "-m", "pretrain.cli",
                                             *TRAIN]


def test_deepspeed_on_one_node_stays_on_the_gpus_cuda_visible_devices_lists(monkeypatch):
    """With --num_accelerators the deepspeed runner drops CUDA_VISIBLE_DEVICES and starts the ranks on GPUs
    0..P-1; the visible ones go to it as --include instead (CUDA present: two GPUs seen through it)."""
    monkeypatch.setattr(launch_cli, "_cuda_gpus", lambda: 2)
    env = {"CUDA_VISIBLE_DEVICES": "4,5"}
    for argv in (["--procs-per-node", "2"], []):  # the default rank count is the visible GPUs too
        p = plan(["--launcher", "deepspeed", *argv, "--master-port", "4000", "--python", PY, "--", *TRAIN],
                 env)
        assert build_command(p) == [str(Path(PY).parent / "deepspeed"), "--include", "localhost:4,5",
                                    "--master_port", "4000", "--no_local_rank", "--module", "pretrain.cli",
                                    *TRAIN]
    p = plan(["--launcher", "deepspeed", "--procs-per-node", "1", "--python", PY, "--", *TRAIN], env)
    assert "localhost:4" in build_command(p)


def test_deepspeed_on_cpu_keeps_num_accelerators_as_the_rank_count(monkeypatch):
    monkeypatch.setattr(launch_cli, "_cuda_gpus", lambda: 0)  # what this CPU machine reports anyway
    p = plan(["--launcher", "deepspeed", "--procs-per-node", "3", "--python", PY, "--", *TRAIN],
             {"CUDA_VISIBLE_DEVICES": "4,5"})
    cmd = build_command(p)
    assert cmd[1:3] == ["--num_accelerators", "3"] and "--include" not in cmd


@pytest.mark.parametrize("visible, procs, words", [
    ("GPU-5d3c1f2e,GPU-77aa0b12", 2, "by index only"),
    ("4,5", 3, "lists 2 GPU"),
    ("4,4", 2, "twice"),
])
def test_cuda_visible_devices_the_deepspeed_launcher_cannot_honour_is_refused(visible, procs, words):
    p = LaunchPlan(launcher="deepspeed", nodes=1, procs_per_node=procs, train_args=TRAIN,
                   visible_devices=visible)
    with pytest.raises(LaunchPlanError, match=words):
        build_command(p)


@pytest.mark.parametrize("visible, refused", [("4,5", True), ("1,0", True), ("0", True), ("0,1", False),
                                              ("0,1,2,3", False)])
def test_deepspeed_on_several_nodes_refuses_visible_gpus_it_would_not_use(tmp_path, monkeypatch, visible,
                                                                          refused):
    """Across nodes the deepspeed runner puts each node's ranks on its GPUs 0..P-1 (the per-node launcher
    sets CUDA_VISIBLE_DEVICES from the hostfile's slots), so `4,5` would land the ranks on another job's
    GPUs: refused with what to use instead; a list that starts 0..P-1 (Slurm's ConstrainDevices) passes."""
    monkeypatch.setattr(launch_cli, "_cuda_gpus", lambda: 2)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    argv = ["--launcher", "deepspeed", "--nodes", "2", "--procs-per-node", "2", "--hostfile", str(hostfile),
            "--master-addr", "n1", "--python", PY, "--", *TRAIN]
    if refused:
        with pytest.raises(LaunchPlanError, match=r"CUDA_VISIBLE_DEVICES=.*0\.\.1 of each node.*torchrun"):
            plan(argv, {"CUDA_VISIBLE_DEVICES": visible})
    else:
        assert "--num_accelerators" in build_command(plan(argv, {"CUDA_VISIBLE_DEVICES": visible}))
    monkeypatch.setattr(launch_cli, "_cuda_gpus", lambda: 0)  # CPU ranks: the variable means nothing here
    assert "--num_accelerators" in build_command(plan(argv, {"CUDA_VISIBLE_DEVICES": "4,5"}))
