"""Training across sites when the sites are set up wrong: two processes with one site name, more sites
than `cross_site.sites`, a site without the others' secret file, a resume at another `cross_site.dp_noise`,
and `--site` on a config that does not train across sites (tests/xsites.py: real OuterLoops on a real
TCPStore on loopback). Each mistake used to run on silently or end in a traceback."""

from __future__ import annotations

import time

import pytest
import torch
from xsites import checkpoint, exchange, join_served_by, site, stop, together, train

from launch.rendezvous import free_port
from parallel.cross_site_names import claim_name, holds_name
from parallel.cross_site_privacy import PrivacyLedger
from parallel.cross_site_store import CrossSiteError, serve
from pretrain.config import ConfigError, load_config


def _store() -> tuple[str, object]:
    address = f"127.0.0.1:{free_port()}"
    return address, serve(address)


def test_a_second_live_process_with_a_sites_name_is_refused():
    """Before: both registered as one site, each took the other's payload for its own earlier life, and one
    site's steps were dropped every round."""
    address, server = _store()
    a, b = site(address, "eu"), site(address, "us")
    together(a.join, b.join)
    twin = site(address, "eu")
    with pytest.raises(CrossSiteError, match=f"another process is running as site eu at {address}.*own name"):
        twin.join()
    train(a, 1)
    train(b, 2)
    ra, rb = together(a._round, b._round)  # the sites go on, both counted
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2
    stop(a, b, twin)
    del server


def _tried(fn):
    """`fn`, returning ("refused", message) instead of raising a CrossSiteError (to run sites together that
    may fail: `together` raises any exception a call returns)."""
    def run():
        try:
            return fn()
        except CrossSiteError as e:
            return ("refused", str(e))
    return run


def _refused(result) -> bool:
    return isinstance(result, tuple) and result[0] == "refused"


def test_two_processes_starting_at_once_with_one_name_never_both_exchange():
    """The reviewer's case: both start together. One is refused at the start, or (when the other's heartbeat
    had not begun yet) takes the name over, and then the other refuses its first round."""
    address, server = _store()
    eu1, eu2, us = site(address, "eu"), site(address, "eu"), site(address, "us")
    joined = together(_tried(eu1.join), _tried(eu2.join), _tried(us.join))
    assert not _refused(joined[2])
    live = [loop for loop, r in zip((eu1, eu2), joined) if not _refused(r)]
    assert live and all("another process is running as site eu" in r[1] for r in joined[:2] if _refused(r))
    for i, loop in enumerate([*live, us]):
        train(loop, i)
    rounds = together(*(_tried(loop._round) for loop in [*live, us]))
    exchanged = [r for r in rounds[:-1] if not _refused(r)]
    assert len(exchanged) == 1 and rounds[-1]["cross_site_sites"] == 2
    stop(eu1, eu2, us)
    del server


def test_a_crashed_sites_name_is_taken_over_and_the_old_process_stops_exchanging():
    """A requeued site comes back under its name while the crashed process's heartbeat stands still; a
    process that was taken over (stalled, not dead) refuses its next round instead of exchanging."""
    address, server = _store()
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    ckpt, w = exchange(a, b, 2, keep_b_at=2)
    stop(b)  # b's process dies: its heartbeat stops, it never gives its name back
    t0 = time.monotonic()
    b2 = site(address, "b", w, state=ckpt)
    b2.join()
    assert time.monotonic() - t0 < 10  # waited at most NAME_WAIT_S for the old heartbeat
    train(a, 3)
    train(b2, 3)
    ra, rb = together(a._round, b2._round)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2 and torch.equal(a.synced, b2.synced)
    with pytest.raises(CrossSiteError, match="round 3: another process took over the name of site b"):
        b._round()
    stop(a, b2)
    del server


def test_a_finished_site_gives_its_name_back_at_once():
    address, server = _store()
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)
    together(a.finish, b.finish)
    again = site(address, "a")
    t0 = time.monotonic()
    claim_name(again.rv, again.nonce, wait_s=10)  # a process that crashed would be waited for up to 10 s
    assert time.monotonic() - t0 < 1 and holds_name(again.rv, again.nonce)
    del server


def test_a_site_beyond_cross_site_sites_is_refused_and_a_replacement_for_a_dead_one_is_not():
    address, server = _store()
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    c = site(address, "c")
    with pytest.raises(CrossSiteError, match=f"site c cannot join the sites at {address}: "
                                             "cross_site.sites is 2 and a, b are running"):
        c.join()
    train(a, 1)
    train(b, 2)
    ra, _ = together(a._round, b._round)
    assert ra["cross_site_sites"] == 2  # c, refused, is not waited for
    stop(b)  # b is gone for good (its heartbeat stands still): d takes its place, with the sites' state
    train(a, 3)
    assert a._round()["cross_site_sites"] == 1  # b dropped: no heartbeat for stale_s
    d = site(address, "d")
    join_served_by(d, a, 4)
    assert torch.equal(d.synced, a.synced)
    train(a, 5)
    train(d, 6)
    ra, rd = together(a._round, d._round)
    assert ra["cross_site_sites"] == rd["cross_site_sites"] == 2
    stop(a, c, d)
    del server


def test_a_site_without_the_others_secret_file_is_told_so(tmp_path):
    """Before: a bare UnicodeDecodeError from decoding a signed value."""
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    address, server = _store()
    a = site(address, "a", secret_file=str(secret))
    a.join()
    b = site(address, "b")
    with pytest.raises(CrossSiteError, match=r"mmpt/xs/generation holds \d+ bytes .*the other sites sign "
                                             r"what they write with cross_site.secret_file, and this site "
                                             "has none"):
        b.join()
    stop(a, b)
    del server


@pytest.mark.parametrize("before", [0.5, 0.0])
def test_resuming_at_another_dp_noise_is_refused_naming_the_key(before):
    """Before: ten rounds at noise 0.5 resumed at 2.0 reported epsilon 8.08 where they had spent 48.8, and
    rounds sent without noise were not counted at all."""
    address, server = _store()
    kw = {"dp_clip": 1.0, "dp_noise": before}
    a, b = site(address, "a", **kw), site(address, "b", **kw)
    together(a.join, b.join)
    ckpt, w = exchange(a, b, 3, keep_b_at=3)
    assert ckpt["dp_noise"] == before
    stop(a, b)
    what = "at cross_site.dp_noise=0.5" if before else "without noise"
    with pytest.raises(CrossSiteError, match=f"site b: its checkpoint released 3 rounds {what}.*cross_site"
                                             r".dp_noise is now 2: .*Resume with the checkpoint's"):
        site(address, "b", w, state=ckpt, dp_clip=1.0, dp_noise=2.0)
    same = site(address, "b", w, state=checkpoint(b), **kw)  # the same noise: resumed
    assert same.ledger.rounds == (3 if before else 0)
    if before:
        assert PrivacyLedger(before, 1e-5, same.ledger.rounds).total() == pytest.approx(
            PrivacyLedger(before, 1e-5, 3).total())
    off = site(address, "b", w, state=ckpt, dp_clip=1.0)  # noise turned off: no epsilon reported, resumed
    assert off.round == 3
    del server


def test_site_or_rendezvous_without_cross_site_sites_is_refused_naming_the_key():
    """`pretrain launch --site eu --rendezvous ...` on a config without cross_site.sites trained alone."""
    with pytest.raises(ConfigError, match=r"cross_site.site / cross_site.rendezvous are set \('eu', "
                                          r"'10.0.0.5:29400'\) but cross_site.sites is 0"):
        load_config(None, ["run.dir=x", "cross_site.site=eu", "cross_site.rendezvous=10.0.0.5:29400"])
    load_config(None, ["run.dir=x", "cross_site.sites=2", "cross_site.site=eu",
                       "cross_site.rendezvous=10.0.0.5:29400"])


def test_a_late_sites_residual_is_not_changed_by_a_payload_nobody_averaged():
    """Error feedback keeps what rounding dropped from a payload the sites average. A late site's payload is
    averaged by nobody (it applies the others' average and its steps are dropped), so its residual must stay
    as it was; it used to keep the rounding error of that payload and send it in the next round."""
    address, server = _store()
    a, b = site(address, "a", timeout_s=2, compress="int8"), site(address, "b", timeout_s=2, compress="int8")
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    a._round()  # waits 2 s for b (alive) and settles round 1 without it
    row = b._round()  # b posts after the round was settled: late
    assert row["cross_site_sites"] == 1 and torch.equal(b.synced, a.synced)
    assert b.feedback.residual.abs().max() == 0  # untouched (zero before the first round)
    assert a.feedback.residual.abs().max() > 0  # a's payload was averaged: it keeps its rounding
    stop(a, b)
    del server


def test_the_store_listens_on_every_interface_whatever_address_it_is_served_at():
    """docs/cross_site.md tells users to firewall the port because torch's TCPStore server binds the wildcard
    address, not the one given (`serve(127.0.0.1:P)` is reachable on every interface). Should torch start
    binding the given address, this fails and the docs can say so."""
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2, which `make test` installs) is not on PATH")
    address, server = _store()
    port = address.rsplit(":", 1)[1]
    listening = [line.split()[3] for line in subprocess.run(["ss", "-ltnH"], capture_output=True, text=True,
                                                          check=True).stdout.splitlines()
                 if line.split()[3].endswith(f":{port}")]
    assert listening and all(a.rsplit(":", 1)[0] in ("*", "0.0.0.0", "[::]") for a in listening), listening
    del server
