"""Choosing a port for rank 0's store that nothing else will take before the ranks bind it.

Asking the kernel for port 0 and handing that number on is a race: the port is free only until the
kernel gives it to someone else, and the kernel gives ports of its ephemeral range to every outgoing
connection and every gloo socket on the machine. With several jobs on one node (two test workers in
CI did it) the store's port went to another run's connection before rank 0 bound it ("Connection
reset by peer", rank 0 exits). Ports below the ephemeral range are never handed out by the kernel,
so only another explicit choice can collide: we take them from a window there (`MMPT_PORT_RANGE`
moves it, e.g. to give concurrent jobs disjoint windows), walk it from a random start so one
process never repeats a port, and skip ports something already listens on.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# is_tcp_port, the one "1-65535" check that every given port goes through, is imported from here; it is
# defined in launch.env, which this module imports, so that env's own MASTER_PORT check adds no cycle
from launch.env import LaunchEnvError, is_tcp_port  # noqa: F401

DEFAULT_RANGE = (20000, 29000)  # below Linux's default ephemeral range, clear of 29500 (torch's default)
_cursor: dict[tuple[int, int], int] = {}


def port_range(env: dict[str, str] | None = None) -> tuple[int, int]:
    """The window [lo, hi) to choose from: `MMPT_PORT_RANGE=lo-hi`, else DEFAULT_RANGE cut below the
    kernel's ephemeral range. Raises LaunchEnvError (a ValueError) naming the variable if malformed."""
    value = (os.environ if env is None else env).get("MMPT_PORT_RANGE", "")
    if value:
        try:
            lo, hi = (int(part) for part in value.split("-"))
        except ValueError:
            raise LaunchEnvError(f"MMPT_PORT_RANGE={value!r}: expected two port numbers as lo-hi, "
                                 "e.g. 20000-29000") from None
        if not 1024 <= lo < hi <= 65536:
            raise LaunchEnvError(f"MMPT_PORT_RANGE={value!r}: expected 1024 <= lo < hi <= 65536")
        return lo, hi
    lo, hi = DEFAULT_RANGE
    return lo, min(hi, _ephemeral_low())


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on, from `port_range()`; the kernel's choice (port 0)
    only when the window is empty or full, which keeps single runs working on odd kernels."""
    lo, hi = port_range()
    if lo < hi:
        start = _cursor.get((lo, hi))
        if start is None:
            start = random.SystemRandom().randrange(lo, hi)  # training code may seed `random`
        for i in range(hi - lo):
            port = lo + (start - lo + i) % (hi - lo)
            if _bindable(host, port):
                _cursor[(lo, hi)] = lo + (port - lo + 1) % (hi - lo)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
