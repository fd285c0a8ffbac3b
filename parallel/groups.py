"""Process groups. Model and loss code ask here for the data-parallel group instead of touching
torch.distributed directly, so the same code runs single-process, under ZeRO and with tensor parallelism.

Layout (megatron-core's default order "tp-cp-ep-dp-pp"): global rank = dp_rank * tp + tp_rank, so the
`tp` ranks of one tensor-parallel group are consecutive (one node's GPUs) and the data-parallel groups
stride across them. megatron-core's `parallel_state` owns the groups; this module only creates them after
torch.distributed is up and answers questions about them. All TP ranks of one DP group must read
identical batches: the trainer splits data by `dp_rank()` / `dp_world_size()`.
"""

from __future__ import annotations

import torch.distributed as dist

from launch.rendezvous import init_process_group

_STATE: dict[str, object] = {"tp": 1, "megatron": False}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_s: int = 600, tp: int = 1) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA) once, then, for
    tp > 1, megatron-core's tensor/data-parallel groups.

    At tp = 1 the data-parallel group is the whole world, which is what every helper below answers
    without megatron's groups, and no megatron-core layer is built: so megatron-core is not even
    imported (its package import and teardown cost about 4 s of every rank's start-up on a CPU).

    A plain `pretrain train` with no launcher becomes a world of one on a free loopback port, so
    DeepSpeed (which insists on a process group) and the trainer keep a single code path. Code that
    runs without any init (unit tests, eval) sees the helpers below degrade to the trivial group.
    """
    if not is_distributed():
        # rank discovery (torchrun/deepspeed, Open MPI, PMI, Slurm, mpi4py) and a checked rendezvous
        init_process_group(timeout_s)
    if tp == 1 and not _STATE["megatron"]:
        return
    init_model_parallel(tp, timeout_s)


def init_model_parallel(tp: int, timeout_s: int = 600) -> None:
    """megatron-core `parallel_state` groups for tensor-parallel degree `tp` (idempotent for one tp).

    Needs torch.distributed initialised. Raises ValueError when the world size is not a multiple of
    `tp` (before megatron would fail with a bare assertion).
    """
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"world size {world} is not divisible by parallel.tp ({tp}); launch a multiple "
                         f"of {tp} ranks or change parallel.tp")
    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ValueError(f"process groups already exist for tp={have}, not {tp}")
    else:
        # gloo duplicates of every group are only needed by megatron's own distributed optimizer
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     distributed_timeout_minutes=max(1, -(-timeout_s // 60)),
                                     create_gloo_process_groups=False)
    _STATE["tp"], _STATE["megatron"] = tp, True


def destroy_model_parallel() -> None:
    """Forget megatron's groups (tests that build several layouts in one process)."""
    if _STATE["megatron"]:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    _STATE["tp"], _STATE["megatron"] = 1, False


def model_parallel_initialized() -> bool:
    """Whether megatron-core's tensor/data-parallel groups exist in this process."""
    return bool(_STATE["megatron"])


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def tp_size() -> int:
    """Tensor-parallel degree of the initialised groups (1 when nothing is initialised)."""
    return int(_STATE["tp"])  # type: ignore[arg-type]


def tp_rank() -> int:
    if not _STATE["megatron"]:
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def get_tensor_parallel_group() -> dist.ProcessGroup | None:
    """The ranks that hold the shards of one layer; None when not initialised."""
    if not _STATE["megatron"]:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def get_data_parallel_group() -> dist.ProcessGroup | None:
    """Group over which samples differ (and ZeRO partitions): megatron's DP group once initialised;
    None (the default world group) before that."""
    if not _STATE["megatron"]:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def dp_world_size() -> int:
    if not _STATE["megatron"]:
        return world_size() // tp_size()
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def dp_rank() -> int:
    if not _STATE["megatron"]:
        return rank() // tp_size()
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together (a barrier, then destroy it) before a successful rank exits.

    Without it, a rank whose peers have already exited can abort in gloo's teardown ("terminate called
    without an active exception", SIGABRT: seen with 4 eval ranks on a loaded 2-core machine)."""
    if not is_distributed():
        return
    dist.barrier()
    destroy_model_parallel()
    dist.destroy_process_group()
