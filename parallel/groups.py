"""Process groups. Model and loss code ask here for the data-parallel group instead of touching
torch.distributed directly, so the same code runs single-process, under ZeRO and (later) with TP."""

from __future__ import annotations

import dataclasses
import datetime
import socket

import torch.distributed as dist

from launch.env import discover, export_torch_env

_STATE: dict[str, object] = {"tp": 1}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_s: int = 600, tp: int = 1) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA) once.

    A plain `pretrain train` with no launcher becomes a world of one on a free loopback port, so
    DeepSpeed (which insists on a process group) and the trainer keep a single code path. Code that
    runs without any init (unit tests, eval) sees the helpers below degrade to the trivial group.
    """
    _STATE["tp"] = tp
    if is_distributed():
        return
    info = discover()
    if info.source == "single":
        info = dataclasses.replace(info, master_port=free_port())
    export_torch_env(info)
    import deepspeed

    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def tp_size() -> int:
    return int(_STATE["tp"])  # type: ignore[arg-type]


def get_data_parallel_group() -> dist.ProcessGroup | None:
    """Group over which samples differ (and ZeRO partitions); None means the default world group."""
    return None


def dp_world_size() -> int:
    return world_size() // tp_size()


def dp_rank() -> int:
    return rank() // tp_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def free_port() -> int:
    """An unused TCP port on loopback (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
