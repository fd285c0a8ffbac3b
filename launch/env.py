"""Find out who we are from whatever started us, and express it as torch.distributed's env vars.

torchrun and the deepspeed launcher set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; Open MPI sets
OMPI_COMM_WORLD_*; MPICH/PMI sets PMI_RANK/PMI_SIZE/MPI_LOCALRANKID; Slurm sets SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS and the node list. Normalising all of them here means the trainer has exactly one code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str
    """Which launcher's variables were used: torch, openmpi, pmi, slurm or single."""


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


def discover(env: dict[str, str] | None = None) -> RankInfo:
    """Rank, local rank, world size and rendezvous address from the environment (first match wins)."""
    e = os.environ if env is None else env
    port = int(e.get("MASTER_PORT", DEFAULT_PORT))
    if "RANK" in e and "WORLD_SIZE" in e:
        return RankInfo(int(e["RANK"]), int(e.get("LOCAL_RANK", 0)), int(e["WORLD_SIZE"]),
                        e.get("MASTER_ADDR", "127.0.0.1"), port, "torch")
    if "OMPI_COMM_WORLD_RANK" in e:
        return RankInfo(int(e["OMPI_COMM_WORLD_RANK"]), int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                        int(e["OMPI_COMM_WORLD_SIZE"]), e.get("MASTER_ADDR", "127.0.0.1"), port, "openmpi")
    if "PMI_RANK" in e:
        return RankInfo(int(e["PMI_RANK"]), int(e.get("MPI_LOCALRANKID", 0)), int(e["PMI_SIZE"]),
                        e.get("MASTER_ADDR", "127.0.0.1"), port, "pmi")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        nodes = expand_nodelist(e.get("SLURM_JOB_NODELIST", e.get("SLURM_NODELIST", "")))
        addr = e.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1")
        return RankInfo(int(e["SLURM_PROCID"]), int(e.get("SLURM_LOCALID", 0)), int(e["SLURM_NTASKS"]),
                        addr, port, "slurm")
    return RankInfo(0, 0, 1, "127.0.0.1", port, "single")


def export_torch_env(info: RankInfo) -> None:
    """Set the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update({
        "RANK": str(info.rank),
        "LOCAL_RANK": str(info.local_rank),
        "WORLD_SIZE": str(info.world_size),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    })
