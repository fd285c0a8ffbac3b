"""Find out who we are from whatever started us, and express it as torch.distributed's env vars.

torchrun and the deepspeed launcher set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; Open MPI sets
OMPI_COMM_WORLD_*; MPICH/PMI sets PMI_RANK/PMI_SIZE/MPI_LOCALRANKID; Slurm sets SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS and the node list. Normalising all of them here means the trainer has exactly one code path.

`discover` only reads variables (pure, unit-testable); `launch.mpi` adds the mpi4py fallback and
`launch.rendezvous` turns the result into a process group.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


class RendezvousError(RuntimeError):
    """The ranks could not meet (master unreachable, ranks missing, port taken) within the timeout.

    Defined here, beside LaunchEnvError, so the command line can catch it without importing torch."""


class LaunchEnvError(ValueError):
    """The launcher's variables contradict each other (e.g. RANK >= WORLD_SIZE). A ValueError, so the
    CLI prints it as one line and exits 2 instead of hanging at the rendezvous."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str
    """Which launcher's variables were used: torch, openmpi, pmi, slurm, mpi4py or single."""
    local_world_size: int = 0
    """Ranks on this node when the launcher says (0: unknown)."""
    master_given: bool = True
    """False when master_addr/port are guesses (no MASTER_ADDR/MASTER_PORT set), so a fallback such as
    mpi4py may replace them with rank 0's real address."""


def is_tcp_port(value: int | str) -> bool:
    """Whether `value` (a number, or a string of digits) is a TCP port, 1-65535: the one check behind every
    port a user gives (MASTER_PORT, --master-port, HOST:PORT addresses, cross_site.rendezvous), each place
    wording its own error. Import it from `launch.ports`; it is defined here, at the bottom of launch's
    imports, because launch.ports imports this module (LaunchEnvError) and imports must not cycle."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):  # "²".isdigit() is True, int("²") raises
            return False
        value = int(value)
    return 0 < value < 65536


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. `n[01-03,7],gpu5` -> n01 n02 n03 n7 gpu5."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def env_int(e: Mapping[str, str], key: str, default: int | None = None) -> int:
    """Integer variable `key` of `e` (`default` when unset or empty); LaunchEnvError naming it otherwise."""
    raw = e.get(key)
    if raw is None or raw == "":
        if default is None:
            raise LaunchEnvError(f"{key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"{key}={raw!r} is not an integer") from None


_int = env_int  # the short name the parsers below use


def slurm_port(e: Mapping[str, str]) -> int:
    """Rendezvous port of a Slurm job: MASTER_PORT, else one derived from the job id so that two jobs
    sharing a node do not collide (the sbatch script uses the same rule)."""
    if e.get("MASTER_PORT"):
        return _int(e, "MASTER_PORT")
    return DEFAULT_PORT + _int(e, "SLURM_JOB_ID", 0) % 1000


def _validate(info: RankInfo, names: str) -> RankInfo:
    """Reject layouts no rendezvous can satisfy, naming the variables they came from."""
    if info.world_size < 1:
        raise LaunchEnvError(f"world size {info.world_size} < 1 ({names})")
    if not 0 <= info.rank < info.world_size:
        raise LaunchEnvError(f"rank {info.rank} is outside world size {info.world_size} ({names}); every "
                             "rank must be started with the same world size and a rank below it")
    if info.local_world_size and not 0 <= info.local_rank < info.local_world_size:
        raise LaunchEnvError(f"local rank {info.local_rank} is outside local world size "
                             f"{info.local_world_size} ({names})")
    if info.local_rank < 0:
        raise LaunchEnvError(f"local rank {info.local_rank} < 0 ({names})")
    if not is_tcp_port(info.master_port):
        raise LaunchEnvError(f"MASTER_PORT={info.master_port} is not a TCP port")
    return info


def in_slurm_step(e: Mapping[str, str]) -> bool:
    """Inside a Slurm job step (a task srun started): there SLURM_PROCID, SLURM_NODEID and the SLURM_STEP_*
    variables describe the step. The batch script and an salloc shell are not one (Slurm still sets
    SLURM_NODEID=0 there, whatever the host)."""
    return bool(e.get("SLURM_STEP_ID", e.get("SLURM_STEPID")))


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """Rank, local rank, world size and rendezvous address from the environment (first match wins).

    Raises LaunchEnvError when the variables found are inconsistent. Inside a Slurm allocation but
    outside a job step (the batch script itself) the SLURM_PROCID/SLURM_NTASKS there describe the
    allocation, not this process, so they are ignored and the run is a world of one.
    """
    e = os.environ if env is None else env
    given = bool(e.get("MASTER_ADDR")) and bool(e.get("MASTER_PORT"))
    addr = e.get("MASTER_ADDR") or "127.0.0.1"
    port = _int(e, "MASTER_PORT", DEFAULT_PORT)
    if "RANK" in e and "WORLD_SIZE" in e:
        return _validate(RankInfo(_int(e, "RANK"), _int(e, "LOCAL_RANK", 0), _int(e, "WORLD_SIZE"), addr,
                                  port, "torch", _int(e, "LOCAL_WORLD_SIZE", 0), given),
                         "RANK/WORLD_SIZE/LOCAL_RANK")
    if "OMPI_COMM_WORLD_RANK" in e:
        return _validate(RankInfo(_int(e, "OMPI_COMM_WORLD_RANK"), _int(e, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                                  _int(e, "OMPI_COMM_WORLD_SIZE"), addr, port, "openmpi",
                                  _int(e, "OMPI_COMM_WORLD_LOCAL_SIZE", 0), given),
                         "Open MPI's OMPI_COMM_WORLD_*")
    if "PMI_RANK" in e:
        return _validate(RankInfo(_int(e, "PMI_RANK"), _int(e, "MPI_LOCALRANKID", 0), _int(e, "PMI_SIZE"),
                                  addr, port, "pmi", _int(e, "MPI_LOCALNRANKS", 0), given),
                         "PMI_RANK/PMI_SIZE/MPI_LOCALRANKID")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and in_slurm_step(e):
        nodes = expand_nodelist(e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST")
                                or e.get("SLURM_NODELIST", ""))
        world = _int(e, "SLURM_STEP_NUM_TASKS", _int(e, "SLURM_NTASKS"))
        return _validate(RankInfo(_int(e, "SLURM_PROCID"), _int(e, "SLURM_LOCALID", 0), world,
                                  e.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"), slurm_port(e),
                                  "slurm", 0, bool(e.get("MASTER_ADDR"))),
                         "SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID")
    return RankInfo(0, 0, 1, "127.0.0.1", port, "single", 1, given)


def mpi_launcher_hint(env: Mapping[str, str] | None = None) -> bool:
    """True when some MPI launcher started us without variables `discover` knows (Intel MPI, MVAPICH,
    Cray PALS, PMIx-only launches): only then is it worth initialising MPI through mpi4py to ask."""
    e = os.environ if env is None else env
    if e.get("MMPT_MPI_DISCOVERY") in ("0", "1"):
        return e["MMPT_MPI_DISCOVERY"] == "1"
    return any(k in e for k in ("PMIX_RANK", "PMI_FD", "PMI_ID", "MV2_COMM_WORLD_RANK", "PALS_RANKID",
                                "MPI_LOCALRANKID", "HYDI_CONTROL_FD", "I_MPI_HYDRA_HOST_FILE"))


def export_torch_env(info: RankInfo) -> None:
    """Set the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update({
        "RANK": str(info.rank),
        "LOCAL_RANK": str(info.local_rank),
        "WORLD_SIZE": str(info.world_size),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    })
    if info.local_world_size:
        os.environ["LOCAL_WORLD_SIZE"] = str(info.local_world_size)
