"""Ask MPI itself, through mpi4py, what launcher variables do not say.

Two gaps: an MPI launcher whose variables `launch.env.discover` does not know (Intel MPI, MVAPICH, Cray
PALS, PMIx-only starts), and mpirun jobs where nobody set MASTER_ADDR/MASTER_PORT. In both cases every
rank already shares MPI_COMM_WORLD, so rank 0 can tell the others where it listens; mpi4py is optional
(`pip install mmpt[mpi]`) and only imported here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import Any

from launch.env import LaunchEnvError, RankInfo, discover, mpi_launcher_hint
from launch.ports import free_port


def _comm() -> Any | None:
    """MPI_COMM_WORLD, or None when mpi4py (or an MPI library for it) is missing."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):
        return None
    return MPI.COMM_WORLD


_layout: list[tuple[int, int, int, int] | None] = []
"""MPI_COMM_WORLD's (rank, node-local rank, size, node size), asked once: the node split is a collective."""


def rank_info_from_mpi(port: int) -> RankInfo | None:
    """Rank, size and node-local rank from MPI_COMM_WORLD; None without mpi4py or in a world of one."""
    if not _layout:
        comm = _comm()
        if comm is None or comm.Get_size() == 1:
            _layout.append(None)
        else:
            from mpi4py import MPI

            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            _layout.append((comm.Get_rank(), node.Get_rank(), comm.Get_size(), node.Get_size()))
            node.Free()
    if _layout[0] is None:
        return None
    rank, local, size, local_size = _layout[0]
    return RankInfo(rank, local, size, "127.0.0.1", port, "mpi4py", local_size, master_given=False)


def launch_rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """Who this process is, as its launcher started it: `discover()`, and MPI_COMM_WORLD's rank and size
    under an MPI launcher whose variables `discover` does not know (mpi4py). Use it, not `discover`, for
    the world size a config is checked against before the process group exists: under that fallback
    `discover` alone says "one process" (`launch.rendezvous.resolve` adds rank 0's address to this)."""
    info = discover(env)
    if info.source == "single" and mpi_launcher_hint(env):
        info = rank_info_from_mpi(info.master_port) or info
    return info


def _interface_address(ifname: str) -> str | None:
    """IPv4 address of a network interface (the one GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME names)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def this_host_address(single_node: bool) -> str:
    """Where rank 0 can be reached: loopback when every rank shares its node, else the address of the
    interface named by GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME, else what the hostname resolves to."""
    if single_node:
        return "127.0.0.1"
    for var in ("MMPT_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = os.environ.get(var, "").split(",")[0]
        if name and (addr := _interface_address(name)):
            return addr
    addr = socket.gethostbyname(socket.gethostname())
    if addr.startswith("127."):
        raise LaunchEnvError(f"rank 0's hostname resolves to {addr}, which other nodes cannot reach; set "
                             "MASTER_ADDR, or GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to the cluster interface")
    return addr


def share_master(info: RankInfo) -> RankInfo | None:
    """Fill in MASTER_ADDR/MASTER_PORT from rank 0 by MPI broadcast; None when mpi4py is unavailable.

    Values the user set win: a given MASTER_ADDR or MASTER_PORT is kept and only the other one chosen.
    """
    comm = _comm()
    if comm is None or comm.Get_size() != info.world_size:
        return None
    choice: tuple[str, int] | str | None = None
    if comm.Get_rank() == 0:
        single_node = bool(info.local_world_size) and info.local_world_size == info.world_size
        try:  # an error must reach every rank too, or the others would wait in bcast forever
            addr = os.environ.get("MASTER_ADDR") or this_host_address(single_node)
            choice = (addr, int(os.environ.get("MASTER_PORT") or free_port("")))
        except LaunchEnvError as e:
            choice = str(e)
    choice = comm.bcast(choice, root=0)
    if isinstance(choice, str):
        raise LaunchEnvError(choice)
    addr, port = choice
    return dataclasses.replace(info, master_addr=addr, master_port=port, master_given=True)
