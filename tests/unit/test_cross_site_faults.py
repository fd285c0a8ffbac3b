"""Training across sites when things go wrong: a store that stops answering, a hosting site that ends, a
heartbeat blip, epsilon after a crash, values written by someone without the shared secret, and a member's
outer state that fails its checks (tests/xsites.py: real OuterLoops on a real store)."""

from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from procs import wait_stopped
from xsites import N, exchange, join_served_by, site, stop, together, train

from launch.rendezvous import free_port
from parallel.cross_site_codec import encode
from parallel.cross_site_link import read_secret
from parallel.cross_site_privacy import PrivacyLedger
from parallel.cross_site_state import RELEASES_FILE, state_problem
from parallel.cross_site_store import (
    NS,
    CrossSiteError,
    Heartbeat,
    Link,
    Liveness,
    StoreGone,
    decode_state,
    encode_state,
    open_store,
    serve,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_listener_that_never_answers_fails_within_the_timeout_naming_the_address():
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    t0 = time.monotonic()
    with pytest.raises(CrossSiteError, match=f"rendezvous 127.0.0.1:{port}: something accepts connections "
                                             "there but did not answer as a TCP store within"):
        open_store(f"127.0.0.1:{port}", 2, may_host=False)
    assert time.monotonic() - t0 < 6
    srv.close()




def test_a_frozen_store_host_fails_every_operation_within_the_timeout_naming_the_address():
    port = free_port()
    code = (f"import time; from parallel.cross_site_link import serve; s = serve('127.0.0.1:{port}'); "
            "print('up', flush=True); time.sleep(120)")
    host = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        link, hosting = open_store(f"127.0.0.1:{port}", 2, may_host=False)
        assert not hosting and link.add("k", 1) == 1
        os.kill(host.pid, signal.SIGSTOP)  # Slurm's `scontrol suspend`, a debugger
        wait_stopped(host.pid)
        t0 = time.monotonic()
        with pytest.raises(StoreGone, match=f"rendezvous 127.0.0.1:{port}: the store stopped answering "
                                            r"\(add k got no answer within 2 s"):
            link.add("k", 1)
        assert time.monotonic() - t0 < 4
        with pytest.raises(StoreGone, match="stopped answering"):  # not tried again: fails at once
            link.check("k")
        with pytest.raises(StoreGone, match="did not answer as a TCP store within 2 s"):
            open_store(f"127.0.0.1:{port}", 2, may_host=False)
    finally:
        host.kill()
        host.wait()


# ------------------------------------------------------------------------------------------ #8 host ends
def test_the_hosting_sites_end_stops_a_running_site_with_a_clear_error():
    address = f"127.0.0.1:{free_port()}"
    a, b = site(address, "a", timeout_s=2), site(address, "b", timeout_s=2)
    assert a.hosting and not b.hosting
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)
    stop(a)
    a.rv.store.raw = None
    del a  # a's process exits: the store it served goes with it
    gc.collect()
    train(b, 3)
    with pytest.raises(StoreGone, match=f"cross-site rendezvous {address}: .* failed .*: the store is gone"):
        b._round()
    stop(b)


def test_a_site_whose_partners_finished_goes_on_alone_when_the_store_goes():
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a", timeout_s=2), site(address, "b", timeout_s=2)
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)
    a.finish()
    train(b, 3)
    assert b._round()["cross_site_sites"] == 1  # a is done: b exchanges alone, and knows it
    beat = b.heartbeat
    del server  # the store's host ends
    gc.collect()
    train(b, 4)
    expected = b.partition.read()  # default outer step (lr 1, no momentum): the site's own weights
    row = b._round()
    assert row["cross_site_round"] == 3 and b.solo and torch.equal(b.synced, expected)
    assert beat is not None and not beat._thread.is_alive() and b.heartbeat is None  # no retries for ever
    b.finish()  # no store to mark itself done at: a warning, not an error


# ------------------------------------------------------------------------------------------ #9 heartbeat
def test_one_failed_beat_does_not_stop_the_heartbeat():
    address = f"127.0.0.1:{free_port()}"
    store = serve(address)
    beat = Heartbeat(address, "b", timeout_s=2)
    real, calls = beat.store, []

    class Blip:  # the beat connection: reset once
        def add(self, key, n):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("Connection reset by peer")
            return real.add(key, n)

    beat.store = Blip()
    live = Liveness(Link(store, address, 2), stale_s=2.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(calls) < 1:
        time.sleep(0.05)
    n = store.add(f"{NS}/beat/b", 0)
    time.sleep(3)  # longer than the backoff after one failure
    assert beat._thread.is_alive() and store.add(f"{NS}/beat/b", 0) > n and live.alive("b")
    beat.stop()


# ------------------------------------------------------------------------------------------ #5 epsilon
def test_epsilon_counts_the_rounds_released_after_the_last_checkpoint(tmp_path):
    """b released rounds 1-4, crashed with a checkpoint of round 2, rejoined and released round 6: five
    releases of its data. Through the store's count, and through the run directory's record when the
    store is a new one."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    kw = {"timeout_s": 5, "dp_clip": 1.0, "dp_noise": 1.0}
    a, b = site(address, "a", **kw), site(address, "b", run_dir=tmp_path, **kw)
    together(a.join, b.join)
    ckpt, w_ckpt = exchange(a, b, 4, keep_b_at=2)
    stop(b)
    b2 = site(address, "b", w_ckpt, state=ckpt, **kw)  # no run_dir: the store's count alone
    join_served_by(b2, a, 5, timeout_s=10)
    train(a, 6)
    train(b2, 6)
    _, rb = together(a._round, b2._round)
    assert b2.ledger.rounds == 5
    assert rb["dp_epsilon"] == pytest.approx(PrivacyLedger(1.0, 1e-5, 5).total(), 1e-3)
    assert len((tmp_path / RELEASES_FILE).read_text().splitlines()) == 4  # b's first life, before each post
    stop(a, b2)
    del server
    address = f"127.0.0.1:{free_port()}"  # a new store knows nothing: the run directory does
    server = serve(address)
    b3 = site(address, "b", w_ckpt, state=ckpt, run_dir=tmp_path, **kw)
    b3.join()
    assert b3.ledger.rounds == 4
    stop(b3)
    del server


# ------------------------------------------------------------------------------------------ #6 signatures
def test_with_a_shared_secret_a_forged_payload_is_refused_naming_the_key(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a = site(address, "a", timeout_s=5, secret_file=str(secret))
    b = site(address, "b", timeout_s=5, secret_file=str(secret))
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)  # signed rounds work as before
    assert torch.equal(a.synced, b.synced)
    train(a, 3)
    train(b, 4)
    posted = threading.Thread(target=b._round, daemon=True)
    posted.start()
    outsider = dist.TCPStore("127.0.0.1", int(address.rsplit(":")[1]), None, False,
                             timeout=datetime.timedelta(seconds=5))
    key = f"{b.rv.ns}/r2/d/b/0"
    while not outsider.check([key]):
        time.sleep(0.01)
    outsider.set(key, encode(torch.full((N,), -50.0), "none"))
    with pytest.raises(CrossSiteError, match=f"{key} fails its signature check"):
        a._round()
    posted.join(10)
    stop(a, b)
    del server


def test_the_secret_file_is_checked_naming_the_key(tmp_path):
    with pytest.raises(CrossSiteError, match=f"cross_site.secret_file {tmp_path}/none: cannot read it"):
        read_secret(str(tmp_path / "none"))
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(CrossSiteError, match="cross_site.secret_file .*short: holds 3 bytes; .* at least 16"):
        read_secret(str(tmp_path / "short"))
    assert read_secret("") is None
    link = Link(None, "h:1", 1, secret=b"k" * 16)
    sealed = link.seal("r1/d/a/0", b"payload")
    assert link.unseal("r1/d/a/0", sealed) == b"payload"
    with pytest.raises(CrossSiteError, match="r2/d/a/0 fails its signature check"):
        link.unseal("r2/d/a/0", sealed)  # replayed under another round's key


# ------------------------------------------------------------------------------------------ #11 checks
def test_a_members_outer_state_is_checked_before_it_is_written():
    good = {"round": 4, "synced": torch.zeros(8), "momentum": torch.zeros(8)}
    assert state_problem(decode_state(encode_state(good)), 8, 1, 5) is None
    assert "9 values of synced, this rank's partition 8" in state_problem(
        {**good, "synced": torch.zeros(9)}, 8, 1, 5)
    assert "1 NaN or inf values in momentum" in state_problem(
        {**good, "momentum": torch.tensor([0.0] * 7 + [float("nan")])}, 8, 1, 5)
    assert "synced as torch.float16" in state_problem({**good, "synced": torch.zeros(8).half()}, 8, 1, 5)
    assert "round 1000000000, expected one in [1, 5]" in state_problem({**good, "round": 10**9}, 8, 1, 5)
    assert "has keys" in state_problem({**good, "extra": 1}, 8, 1, 5)
    from safetensors.torch import save  # metadata that would replace a tensor: refused, not merged
    forged = save({"synced": torch.zeros(8), "momentum": torch.zeros(8)},
                  metadata={"json": '{"round": 4, "synced": [1, 2]}'})
    with pytest.raises(ValueError, match="metadata and tensors both name synced"):
        decode_state(forged)
    with pytest.raises(ValueError, match="not an outer state"):
        decode_state(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")


def test_a_rejoining_site_refuses_a_published_state_that_fails_the_checks():
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)
    stop(b)
    b2 = site(address, "b", b.partition.read() + 1.0)
    a.rv.publish_state(7, {"round": 1, "synced": torch.zeros(N + 1), "momentum": torch.zeros(N + 1)})
    a.rv.publish_state(8, {"round": 1, "synced": a.synced + 1, "momentum": a.momentum})
    b2.rv.use(a.rv.generation)
    from parallel.cross_site_join import take

    with pytest.raises(CrossSiteError, match=r"refuses the outer state .*\(ticket 7\): rank 0: the state has "
                                             f"{N + 1} values of synced, this rank's partition {N}"):
        take(b2, 7)
    with pytest.raises(CrossSiteError, match="ticket 8.*digest is not the one the sites recorded after"):
        take(b2, 8)
    assert torch.equal(b2.partition.w, b.partition.read() + 1.0)  # nothing written
    stop(a)
    del server
