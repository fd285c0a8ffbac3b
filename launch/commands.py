"""The exact command line each launcher needs to start `pretrain train` on N nodes x P processes.

Pure functions from a LaunchPlan to an argv list, so `pretrain launch --dry-run` prints precisely what
a run executes and unit tests can pin every flag. Where the ranks find rank 0 is decided here once
(MASTER_ADDR/MASTER_PORT, or left to mpi4py under mpirun) and passed the way each launcher expects.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCHERS = ("deepspeed", "torchrun", "mpirun", "srun")
TRAINER_MODULE = "pretrain.cli"


@dataclass(frozen=True)
class LaunchPlan:
    launcher: str
    nodes: int
    procs_per_node: int
    train_args: tuple[str, ...]
    """The `pretrain` subcommand and its arguments, e.g. ("train", "--config", "c.yaml", "train.steps=9")."""
    master_addr: str | None = "127.0.0.1"
    """None under mpirun: the ranks agree on rank 0's address themselves (mpi4py, launch/mpi.py)."""
    master_port: int | None = 29500
    node_rank: int = 0
    """This node's index, for per-node starts (torchrun, deepspeed --no_ssh)."""
    hostfile: str | None = None
    no_ssh: bool = False
    """deepspeed: start only this node's ranks (one `pretrain launch` per node, e.g. from srun)."""
    launcher_args: tuple[str, ...] = ()
    """Extra flags passed to the launcher before the program (site-specific MPI/srun options)."""
    python: str = sys.executable
    as_root: bool = False
    """mpirun: Open MPI refuses to run as root without --allow-run-as-root."""
    mpi_flavor: str = "openmpi"
    """openmpi or mpich (hydra): they spell per-node counts, hostfiles and env exports differently."""
    visible_devices: str | None = None
    """deepspeed on one node with CUDA: the CUDA_VISIBLE_DEVICES the ranks must stay on (None: unset, or no
    CUDA). The deepspeed runner drops the variable once --num_accelerators is given and puts the ranks on
    GPUs 0..P-1, so these indices go to it as --include instead."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class LaunchPlanError(ValueError):
    """A launch request that cannot work (e.g. several nodes and no way to find rank 0)."""


def _program(plan: LaunchPlan) -> list[str]:
    return [plan.python, "-m", TRAINER_MODULE, *plan.train_args]


def _beside_python(plan: LaunchPlan, name: str) -> str:
    """A console script of the same environment as `plan.python`, even when it is not on PATH."""
    beside = Path(plan.python).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def visible_gpus(visible: str, procs: int) -> list[str]:
    """The first `procs` GPU indices of a CUDA_VISIBLE_DEVICES value, for deepspeed's `--include`.

    Raises LaunchPlanError when the value lists fewer GPUs than ranks, repeats one, or names GPUs by UUID
    (the deepspeed runner only takes indices)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(i.isdigit() for i in ids):
        raise LaunchPlanError(f"CUDA_VISIBLE_DEVICES={visible!r}: the deepspeed launcher selects GPUs by "
                              "index only; list indices (e.g. 4,5) or use --launcher torchrun")
    if len(set(ids)) != len(ids):
        raise LaunchPlanError(f"CUDA_VISIBLE_DEVICES={visible!r} lists a GPU twice")
    if len(ids) < procs:
        raise LaunchPlanError(f"--procs-per-node {procs} but CUDA_VISIBLE_DEVICES={visible!r} lists "
                              f"{len(ids)} GPU(s): one rank per GPU")
    return ids[:procs]


def deepspeed_command(plan: LaunchPlan) -> list[str]:
    """`deepspeed` launcher: one node directly; several nodes over ssh/pdsh with a hostfile, or one
    start per node with `--no_ssh --node_rank` (what Slurm's srun does for us)."""
    cmd = [_beside_python(plan, "deepspeed")]
    if plan.hostfile:
        cmd += ["--hostfile", plan.hostfile]
    elif plan.nodes > 1:
        raise LaunchPlanError("deepspeed on several nodes needs a hostfile (--hostfile, or run inside a "
                              "Slurm allocation to write one from SLURM_JOB_NODELIST)")
    if plan.nodes > 1 or plan.hostfile:
        cmd += ["--num_nodes", str(plan.nodes)]
    if plan.visible_devices is not None and plan.nodes == 1 and not plan.hostfile:
        cmd += ["--include", "localhost:" + ",".join(visible_gpus(plan.visible_devices, plan.procs_per_node))]
    else:  # CPU: the rank count; several nodes: GPUs 0..P-1 of each (Slurm ConstrainDevices numbering)
        cmd += ["--num_accelerators", str(plan.procs_per_node)]
    if plan.master_addr and (plan.nodes > 1 or plan.hostfile):
        cmd += ["--master_addr", plan.master_addr]
    if plan.master_port:
        cmd += ["--master_port", str(plan.master_port)]
    if plan.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(plan.node_rank)]
    cmd += [*plan.launcher_args, "--no_local_rank", "--module", TRAINER_MODULE, *plan.train_args]
    return cmd


def torchrun_command(plan: LaunchPlan) -> list[str]:
    """torchrun with static rendezvous: run once per node with its --node_rank."""
    if plan.master_addr is None or plan.master_port is None:
        raise LaunchPlanError("torchrun needs a master address and port")
    return [plan.python, "-m", "torch.distributed.run", "--nnodes", str(plan.nodes),
            "--nproc_per_node", str(plan.procs_per_node), "--node_rank", str(plan.node_rank),
            "--master_addr", plan.master_addr, "--master_port", str(plan.master_port),
            *plan.launcher_args, "-m", TRAINER_MODULE, *plan.train_args]


def mpirun_command(plan: LaunchPlan) -> list[str]:
    """mpirun (Open MPI or MPICH hydra). Ranks read OMPI_COMM_WORLD_* / PMI_*; rank 0's address goes in
    the environment when known, else the ranks broadcast it over MPI (launch/mpi.py)."""
    env = {k: str(v) for k, v in (("MASTER_ADDR", plan.master_addr), ("MASTER_PORT", plan.master_port))
           if v is not None}
    if plan.mpi_flavor == "openmpi":
        cmd = ["mpirun", "-np", str(plan.world_size), "--npernode", str(plan.procs_per_node)]
        if plan.as_root:
            cmd.append("--allow-run-as-root")
        if not any(a.startswith("--bind-to") for a in plan.launcher_args):
            # Open MPI pins each rank to one core by default; its data workers and intra-op threads would
            # all share that core (torchrun and deepspeed do not pin either)
            cmd += ["--bind-to", "none"]
        if plan.hostfile:
            cmd += ["--hostfile", plan.hostfile]
        for k, v in env.items():
            cmd += ["-x", f"{k}={v}"]
    elif plan.mpi_flavor == "mpich":
        cmd = ["mpirun", "-n", str(plan.world_size), "-ppn", str(plan.procs_per_node)]
        if plan.hostfile:
            cmd += ["-f", plan.hostfile]
        for k, v in env.items():
            cmd += ["-genv", k, v]
    else:
        raise LaunchPlanError(f"unknown MPI flavour {plan.mpi_flavor!r} (openmpi or mpich)")
    return [*cmd, *plan.launcher_args, *_program(plan)]


def srun_command(plan: LaunchPlan) -> list[str]:
    """srun: one task per rank; ranks read SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS."""
    export = "ALL" + "".join(f",{k}={v}" for k, v in (("MASTER_ADDR", plan.master_addr),
                                                      ("MASTER_PORT", plan.master_port)) if v is not None)
    return ["srun", "--nodes", str(plan.nodes), "--ntasks-per-node", str(plan.procs_per_node),
            "--ntasks", str(plan.world_size), "--kill-on-bad-exit=1", f"--export={export}",
            *plan.launcher_args, *_program(plan)]


BUILDERS = {"deepspeed": deepspeed_command, "torchrun": torchrun_command, "mpirun": mpirun_command,
            "srun": srun_command}


def build_command(plan: LaunchPlan) -> list[str]:
    """argv for `plan`; raises LaunchPlanError for requests no launcher can satisfy."""
    if plan.launcher not in BUILDERS:
        raise LaunchPlanError(f"unknown launcher {plan.launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if plan.nodes < 1 or plan.procs_per_node < 1:
        raise LaunchPlanError(f"--nodes ({plan.nodes}) and --procs-per-node ({plan.procs_per_node}) "
                              "must be >= 1")
    if not plan.train_args:
        raise LaunchPlanError("nothing to launch: add `-- train [ARGS]`")
    if not 0 <= plan.node_rank < plan.nodes:
        raise LaunchPlanError(f"node rank {plan.node_rank} is outside 0..{plan.nodes - 1}")
    if plan.no_ssh and plan.launcher != "deepspeed":
        raise LaunchPlanError("--no-ssh is a deepspeed launcher mode")
    return BUILDERS[plan.launcher](plan)


def render(cmd: list[str]) -> str:
    """One shell-quoted line, as --dry-run prints it (copy-paste runs the same thing)."""
    return shlex.join(cmd)
