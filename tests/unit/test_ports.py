"""The store port comes from a window below the kernel's ephemeral range, never repeats in one process,
and skips ports in use; a malformed MMPT_PORT_RANGE is refused naming the variable."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from launch import ports
from launch.env import LaunchEnvError


def test_default_window_sits_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMPT_PORT_RANGE", raising=False)
    lo, hi = ports.port_range()
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if ephemeral_low <= ports.DEFAULT_RANGE[0] + 50:
        pytest.skip(f"this kernel's ephemeral range starts at {ephemeral_low}: no window below it")
    assert 1024 <= lo < hi <= ephemeral_low
    assert not lo <= 29500 < hi  # torch's and our Slurm script's default port stays clear
    chosen = [ports.free_port() for _ in range(50)]
    assert len(set(chosen)) == 50 and all(lo <= p < hi for p in chosen)


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMPT_PORT_RANGE", raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        busy = ports.free_port()
        held.bind(("127.0.0.1", busy))
        held.listen()
        monkeypatch.setenv("MMPT_PORT_RANGE", f"{busy}-{busy + 2}")
        got = {ports.free_port() for _ in range(4)}
        assert got == {busy + 1}  # the window's only free port, every time
        monkeypatch.setenv("MMPT_PORT_RANGE", f"{busy}-{busy + 1}")
        assert ports.free_port() != busy  # a full window falls back to the kernel's choice


@pytest.mark.parametrize("value", ["20000", "a-b", "30000-20000", "80-90"])
def test_bad_range_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MMPT_PORT_RANGE", value)
    with pytest.raises(LaunchEnvError, match="MMPT_PORT_RANGE"):
        ports.free_port()
