"""Hosts of a Slurm allocation, their addresses, and the hostfiles launchers read.

Slurm names nodes (`n[1-2]`); the address other nodes reach a node at is its NodeAddr, which differs
from the name on clusters (and on test set-ups) where names do not resolve. The deepspeed launcher and
mpirun want a hostfile: one line per host with its slot count, in their two spellings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from launch.commands import LaunchPlanError
from launch.env import expand_nodelist


def slurm_hosts(env: Mapping[str, str] | None = None) -> list[str]:
    """Node names of the current allocation (job step first, then job), in Slurm's order."""
    e = os.environ if env is None else env
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST") or ""
    return expand_nodelist(nodelist) if nodelist else []


def node_address(node: str) -> str:
    """NodeAddr of a Slurm node as `scontrol` reports it; the name itself when Slurm is not reachable."""
    if shutil.which("scontrol") is None:
        return node
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return node
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) pairs from a deepspeed (`host slots=N`) or Open MPI (`host slots=N`/`host`) file.

    Raises LaunchPlanError naming the file (and line) when it is missing, has no hosts, or a line's
    `slots=` is not a positive integer: the launchers themselves fail later and less clearly."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchPlanError(f"hostfile {path}: cannot read it ({e})") from None
    hosts: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, *rest = line.split()
        slots = 1
        for item in rest:
            if item.startswith("slots="):
                value = item.split("=", 1)[1]
                if not value.isdigit() or int(value) < 1:
                    raise LaunchPlanError(f"hostfile {path}, line {number}: {item!r} is not a positive slot "
                                          "count (expected `host slots=N`)")
                slots = int(value)
        hosts.append((name, slots))
    if not hosts:
        raise LaunchPlanError(f"hostfile {path} lists no hosts (expected `host slots=N` lines)")
    return hosts


def hostfile_text(hosts: list[str], slots: int) -> str:
    """`host slots=N` lines: the format of both the deepspeed launcher and Open MPI's mpirun."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


_WRITTEN: list[Path] = []
"""Hostfiles this process wrote, removed when it exits (`_remove_written`)."""


def _remove_written() -> None:
    for path in _WRITTEN:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def written_hostfiles() -> list[Path]:
    """The hostfiles this process wrote and has not removed yet (`pretrain launch --dry-run` shows them)."""
    return [p for p in _WRITTEN if p.exists()]


def write_hostfile(hosts: list[str], slots: int, directory: str | None = None) -> Path:
    """Write a hostfile for `hosts` into `directory` (default: $TMPDIR) and return its path.

    Each node of a `--no_ssh` start writes its own copy, so the file need not be on shared storage. The
    file is removed when this process exits (`--dry-run` included): `pretrain launch` outlives the deepspeed
    runner that reads it (a child, not exec'd), and one file per node, start and requeue would otherwise pile
    up in /tmp. A caller that execs a launcher reading it must not use this (the file would stay).
    """
    job = os.environ.get("SLURM_JOB_ID", "local")
    fd, name = tempfile.mkstemp(prefix=f"mmpt-hostfile-{job}-", dir=directory)
    if not _WRITTEN:
        atexit.register(_remove_written)
    _WRITTEN.append(Path(name))
    with os.fdopen(fd, "w") as fh:
        fh.write(hostfile_text(hosts, slots))
    return Path(name)
