"""Rank discovery from each launcher's variables, and the errors for layouts no rendezvous can satisfy."""

from __future__ import annotations

import os
import signal

import pytest

from launch.env import LaunchEnvError, discover, expand_nodelist, mpi_launcher_hint
from launch.signals import REQUEUE_EXIT_CODE, StoppedForRequeue, StopRequest
from parallel.consensus import any_rank


def test_torchrun_and_deepspeed_variables():
    info = discover({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port, info.source) == \
        (3, 1, 4, "10.0.0.5", 1234, "torch")
    assert info.master_given


def test_open_mpi_variables_win_over_slurm():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.source) == \
        (1, 1, 2, 2, "openmpi")
    assert not info.master_given  # mpi4py may replace the 127.0.0.1 guess with rank 0's real address


def test_mpich_pmi_variables():
    info = discover({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0"})
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.source) == \
        (5, 1, 8, "h0", "pmi")


def test_slurm_step_variables_and_master_from_nodelist():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (3, 1, 4, "slurm")
    assert info.master_addr == "gpu07"
    assert info.master_port == 29500 + 1234 % 1000  # the same rule as slurm/pretrain.sbatch


def test_slurm_batch_shell_is_not_a_rank():
    """The batch script sees SLURM_PROCID=0 and the allocation's SLURM_NTASKS; a plain `pretrain train`
    there must not wait for ranks that nobody started."""
    info = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
                     "SLURM_JOB_NODELIST": "n1"})
    assert (info.world_size, info.source) == (1, "single")


def test_nothing_set_is_a_world_of_one():
    assert discover({}).source == "single"


@pytest.mark.parametrize("env, words", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["rank 2", "world size 2", "RANK/WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "0"}, ["world size 0"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'", "not an integer"]),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"}, ["rank 4", "OMPI_COMM_WORLD"]),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "2"}, ["local rank 3"]),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
])
def test_inconsistent_variables_are_a_clear_error(env, words):
    with pytest.raises(LaunchEnvError) as err:
        discover(env)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_nodelist_expansion():
    assert expand_nodelist("n[01-03,7],gpu5,a[8-10]x") == \
        ["n01", "n02", "n03", "n7", "gpu5", "a8x", "a9x", "a10x"]


def test_mpi4py_is_asked_only_when_an_mpi_launcher_is_around():
    assert not mpi_launcher_hint({})
    assert mpi_launcher_hint({"PMIX_RANK": "0"})
    assert not mpi_launcher_hint({"PMIX_RANK": "0", "MMPT_MPI_DISCOVERY": "0"})
    assert mpi_launcher_hint({"MMPT_MPI_DISCOVERY": "1"})


def test_stop_request_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not overwrite the first
        assert stop.requested and stop.signal_name == "SIGUSR1"
        assert any_rank(stop.requested)  # no process group: the local flag
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    exc = StoppedForRequeue(12, "SIGUSR1")
    assert isinstance(exc, SystemExit) and exc.code == REQUEUE_EXIT_CODE and "step 12" in str(exc)
