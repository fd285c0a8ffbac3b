"""Two "hosts" on one machine: a pair of network namespaces joined by a veth link (root only).

Used by the launch tests (torchrun across two namespaces), the cross-site tests and `pretrain bench
cross-site`, which count what crosses the link with the kernel's own interface counters, the one byte
counter that sees every protocol alike (gloo collectives, the cross-site store, heartbeats). `tc`'s token
bucket (tbf) can make the link slow; this machine's kernel has no netem, so there is no added delay.

Traffic between the namespaces never leaves the machine. Run every client inside a namespace: the root
namespace has no route to the pair's subnet and would send such packets out through the real interface.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

IFACE = "tnet0"
"""The link's interface name inside both namespaces (GLOO_SOCKET_IFNAME=tnet0 works on either side)."""


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    absent = [p for p in ("ip", "tc") if shutil.which(p) is None and not os.path.exists(f"/usr/sbin/{p}")]
    return f"not installed: {', '.join(absent)} (Debian package iproute2)" if absent else None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    """One side of the pair: namespace name and its address on the link."""

    ns: str
    addr: str

    def prefix(self, *env: str) -> list[str]:
        """Command prefix that runs a program inside this namespace (with `env` VAR=VALUE settings)."""
        return ["ip", "netns", "exec", self.ns, "env", *env]

    def link_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes of this side's end of the link, from the kernel's counters."""
        out = subprocess.run(["ip", "-n", self.ns, "-s", "-j", "link", "show", IFACE], check=True,
                             capture_output=True, text=True).stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    def limit_rate(self, mbit: float, burst_kb: int = 4) -> None:
        """Shape what this side sends to `mbit` Mbit/s (tc tbf, `burst_kb` KB bucket)."""
        subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", IFACE, "root", "tbf",
                        "rate", f"{mbit}mbit", "burst", f"{burst_kb}kb", "latency", "2s"], check=True)


@contextmanager
def netns_pair(subnet: str = "10.77.0") -> Iterator[tuple[Host, Host]]:
    """Two network namespaces joined by a veth pair, interface `tnet0` on both sides, addresses
    `subnet`.1 and `subnet`.2, loopback up in both.

    Names carry this process's PID so parallel runs do not collide; both namespaces (and with them the
    veth pair) are deleted on exit, whatever happened inside."""
    tag = f"{os.getpid() % 100000}"
    names = (f"mmpt{tag}a", f"mmpt{tag}b")
    addrs = (f"{subnet}.1", f"{subnet}.2")
    created: list[str] = []
    try:
        for n in names:
            _ip("netns", "add", n)
            created.append(n)
        _ip("link", "add", f"mv{tag}a", "type", "veth", "peer", "name", f"mv{tag}b")
        for n, end, addr in zip(names, ("a", "b"), addrs):
            _ip("link", "set", f"mv{tag}{end}", "netns", n)
            _ip("-n", n, "link", "set", f"mv{tag}{end}", "name", IFACE)
            _ip("-n", n, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", n, "link", "set", "lo", "up")
            _ip("-n", n, "link", "set", IFACE, "up")
        yield Host(names[0], addrs[0]), Host(names[1], addrs[1])
    finally:
        for n in created:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"mv{tag}a"], capture_output=True)  # if never moved
