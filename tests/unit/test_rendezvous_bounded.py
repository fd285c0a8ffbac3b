"""The job's rendezvous ends in time against a peer that accepts TCP connections but never answers.

TCPStore's own timeout does not cover that case: its client constructor and its operations wait for ever
on another service listening on MASTER_PORT, or on rank 0's host frozen by `scontrol suspend`, a debugger
or SIGSTOP. Each test runs the rendezvous on a thread joined with a bound, so a regression fails here
instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from procs import wait_stopped

from launch import rendezvous
from launch.env import RankInfo, RendezvousError
from launch.ports import free_port, is_tcp_port

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 20.0
"""A call still blocked after this long counts as hung (the timeouts below are 2 s)."""


def bounded(fn: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """(the error `fn` raised or None, seconds it took) -- or a test failure if it is still blocked after
    HANG_S (the thread is a daemon: a hung call does not hold the test run)."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            box["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        pytest.fail(f"still blocked after {HANG_S:g} s: the rendezvous hangs on a store that never answers")
    return box.get("error"), time.monotonic() - t0




@pytest.fixture
def silent_port():
    """A port where something accepts connections and never says a word (another service on MASTER_PORT)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", free_port()))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


def test_rank_1_fails_in_time_naming_the_address_when_another_service_holds_master_port(silent_port,
                                                                                         monkeypatch):
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(silent_port)}.items():
        monkeypatch.setenv(key, value)  # init_process_group exports them again; monkeypatch restores them
    for key in ("LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    error, took = bounded(lambda: rendezvous.init_process_group(2))
    assert isinstance(error, RendezvousError), error
    message = str(error)
    assert f"rank 1 of 2 (from torch variables), master 127.0.0.1:{silent_port}" in message
    assert (f"something accepts connections at 127.0.0.1:{silent_port} but did not answer as rank 0's TCP "
            "store") in message
    assert "another service may be listening on MASTER_PORT" in message and "frozen" in message
    assert took < 10


def test_every_store_call_of_the_rendezvous_ends_in_time_when_rank_0s_host_is_frozen():
    port = free_port()
    code = (f"import time; from launch.rendezvous import serve_store; s = serve_store('127.0.0.1', {port}, "
            "60); print('up', flush=True); time.sleep(120)")
    host = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "up"
        info = RankInfo(1, 1, 2, "127.0.0.1", port, "torch")
        store = rendezvous._open_store(info, 30, time.monotonic() + 30)  # rank 0's store answers: joined
        os.kill(host.pid, signal.SIGSTOP)  # Slurm's `scontrol suspend`, a debugger
        wait_stopped(host.pid)

        error, took = bounded(lambda: rendezvous._check_world(store, info, time.monotonic() + 2))
        assert isinstance(error, RendezvousError), error
        assert (f"rank 1 of 2 (from torch variables), master 127.0.0.1:{port}: the store at 127.0.0.1:{port}"
                " accepted the connection but add mmpt/rendezvous/") in str(error)
        assert "got no answer within" in str(error) and "rank 0's host is frozen" in str(error)
        assert took < 10

        # explaining a failed process group asks the same store: that ends too, and says why
        said: list[str] = []
        error, took = bounded(lambda: said.append(rendezvous._explain_timeout(store, info, 2,
                                                                              RuntimeError("x"))))
        assert error is None and "the store stopped answering" in said[0] and "frozen" in said[0], said
        assert took < 10

        # and a rank joining only now fails in time as well
        error, took = bounded(lambda: rendezvous._open_store(info, 2, time.monotonic() + 2))
        assert isinstance(error, RendezvousError) and f"127.0.0.1:{port}" in str(error), error
        assert took < 10
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("value, ok", [(1, True), (65535, True), (0, False), (65536, False), (-1, False),
                                       ("29500", True), ("0", False), ("70000", False), ("", False),
                                       ("29a", False), (" 1", False)])
def test_one_port_check(value, ok):
    assert is_tcp_port(value) is ok


def test_a_non_ascii_digit_is_no_port_and_a_config_naming_one_gets_the_config_error():
    """'²'.isdigit() is True but int('²') raises: the check says no instead of raising, so the config's
    collected error names the key."""
    from pretrain.config import ConfigError
    from pretrain.config.loading import load_config

    assert is_tcp_port("²") is False and is_tcp_port("٣٠٠٠") is False
    with pytest.raises(ConfigError, match="cross_site.rendezvous"):
        load_config(None, ["cross_site.sites=2", "cross_site.site=a", "cross_site.rendezvous=h:²"])
