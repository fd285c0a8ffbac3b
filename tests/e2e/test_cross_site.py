"""Training across sites with the real launcher: each site is its own `pretrain launch --launcher deepspeed
--site NAME --rendezvous HOST:PORT` job on loopback, reading its own shards, with a shared tokenizer.

- two sites x two ranks, int8 exchange every 2 steps with clipping and noise: both finish, their weights
  are equal after every round (each checkpoint, written after that step's round), the bytes sent are
  counted exactly and epsilon is reported per round and in total;
  a third site with another `cross_site.every` refuses to join, naming the key.
- a site killed mid-run (1-bit `sign` exchange): the other goes on with a log line naming it, the killed
  one comes back with `--resume latest`, takes the survivor's outer state and the two train together again.
- the two sites (tensor-parallel, tp=2) in two network namespaces joined by a link that tc limits to
  1 Mbit/s each way: every payload crosses that link (its byte counters), the rounds take as long as the
  link needs, and the sites end equal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from localcluster import missing
from tiny import MICRO, PYTHON, ROOT

from launch.netns import netns_pair
from launch.rendezvous import free_port
from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.weights_only import safe_load
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow
COMMON = [*MICRO, "cross_site.sites=2", "cross_site.every=2", "cross_site.compress=int8",
          "parallel.timeout_s=120"]


@pytest.fixture(scope="module")
def sites_data(tmp_path_factory) -> dict[str, str]:
    """Each site's own 160 samples (different seeds) and one tokenizer every site uses."""
    from data_pipelines.synth import write_synthetic_shards
    from data_pipelines.tokenizer import train_tokenizer_from_shards

    d = tmp_path_factory.mktemp("sites")
    out = {}
    for i, name in enumerate("ab"):
        write_synthetic_shards(d / name, samples=160, samples_per_shard=80, image_size=32, seed=10 + i)
        out[name] = f"{d}/{name}/shard-{{000000..000001}}.tar"
    train_tokenizer_from_shards(out["a"], 128, 160, 0).save(d / "tokenizer.json")
    out["tokenizer"] = str(d / "tokenizer.json")
    return out


class Site:
    """One site's `pretrain launch` in its own session, output to files the test reads while it runs."""

    def __init__(self, tmp: Path, name: str, data: dict[str, str], rendezvous: str, procs: int,
                 *extra: str, env: dict[str, str] | None = None, resume: bool = False, log: str = "",
                 netns: str = "") -> None:
        self.run = tmp / f"run-{name}"
        self.log = tmp / f"{log or name}.log"
        # in a network namespace the site's own ranks talk over that namespace's loopback
        where = ["ip", "netns", "exec", netns, "env", "GLOO_SOCKET_IFNAME=lo"] if netns else []
        args = [*where, PYTHON, "-m", "pretrain.cli", "launch", "--launcher", "deepspeed", "--procs-per-node",
                str(procs), "--site", name, "--rendezvous", rendezvous, "--", "train", *COMMON,
                f"data.train={data[name[0]]}", f"data.tokenizer={data['tokenizer']}", f"run.dir={self.run}",
                *extra, *(["--resume", "latest"] if resume else [])]
        self._fh = self.log.open("w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"site timed out; its log:\n{self.text()[-4000:]}") from None
        finally:
            self._fh.close()

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} in the log:\n{self.text()[-4000:]}")
            time.sleep(0.5)


def _wait_for_fingerprint(rendezvous: str, site: Site, timeout: float) -> None:
    """Until the first site has registered its fingerprint at the rendezvous store."""
    import datetime
    import socket

    import torch.distributed as dist

    host, port = rendezvous.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline and site.proc.poll() is None, site.text()[-3000:]
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            time.sleep(0.5)
            continue
        store = dist.TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=10))
        if store.check(["mmpt/xs/config"]):
            return
        time.sleep(0.5)


def _payload_bytes(numel: int, codec: str = "int8") -> int:
    """A payload: 12-byte header, one fp32 scale per 1024 values, then a byte (int8) or a bit (sign) per
    value."""
    return 12 + 4 * -(-numel // 1024) + (numel if codec == "int8" else -(-numel // 8))


def test_two_sites_stay_equal_count_bytes_and_a_mismatched_site_is_refused(sites_data, tmp_path):
    rendezvous = f"127.0.0.1:{free_port()}"
    release = tmp_path / "release"  # a holds after step 1 until the refused site has come and gone
    dp = ("cross_site.dp_clip=0.01", "cross_site.dp_noise=1.0")  # noise in what is sent; equal all the same
    a = Site(tmp_path, "a", sites_data, rendezvous, 2, "train.steps=4", "checkpoint.every=2",
             "cross_site.timeout_s=100", *dp, env={"MMPT_FAULT_HOLD": f"1:{release}"})
    b = Site(tmp_path, "b", sites_data, rendezvous, 2, "train.steps=4", "checkpoint.every=2",
             "cross_site.timeout_s=100", *dp)
    _wait_for_fingerprint(rendezvous, a, 120)  # a or b set the reference: the third site comes later
    c = Site(tmp_path, "b2", sites_data, rendezvous, 1, "train.steps=4", "cross_site.every=3",
             "cross_site.timeout_s=30")
    rc_c = c.wait(120)
    release.touch()
    assert rc_c != 0
    assert "site b2 refuses to join the sites at" in c.text()
    assert "cross_site.every: 3 here, 2 there" in c.text() and "Traceback" not in c.text()
    assert a.wait(180) == 0, a.text()[-4000:]
    assert b.wait(180) == 0, b.text()[-4000:]

    for site in (a, b):
        assert "cross-site round 2: 2 site(s) (a, b)" in site.text()
        assert "did not deliver" not in site.text()
    for tag in ("global_step2", "global_step4"):  # each saved after that step's round
        wa = ckpt.consolidated_state_dict(a.run / "checkpoints", tag)
        wb = ckpt.consolidated_state_dict(b.run / "checkpoints", tag)
        assert wa.keys() == wb.keys()
        assert all(wa[k].equal(wb[k]) for k in wa), tag
    # the sites trained on different data: their weights moved apart between rounds, only the round joins them
    assert read_metrics(a.run)[0]["loss"] != read_metrics(b.run)[0]["loss"]

    numels = [safe_load(p)["mmpt"]["cross_site"]["synced"].numel()
              for p in sorted((a.run / "checkpoints" / "global_step4").glob("*model_states.pt"))]
    assert len(numels) == 2  # one partition per rank: no rank holds the whole model
    rows = {r["step"]: r for r in read_metrics(a.run) if "loss" in r}
    assert rows[4]["cross_site_round"] == 2 and rows[4]["cross_site_sites"] == 2
    assert rows[4]["cross_site_bytes"] == 2 * sum(_payload_bytes(n) for n in numels)
    assert rows[4]["cross_site_bytes"] < 2 * 4 * sum(numels) / 3.5  # ~4x fewer bytes than fp32
    from parallel.cross_site_privacy import PrivacyLedger

    eps = PrivacyLedger(1.0, 1e-5, rounds=2).total()  # opacus's RDP accountant, 2 rounds
    assert rows[4]["dp_epsilon"] == pytest.approx(eps, rel=1e-3) and rows[2]["dp_epsilon"] < eps
    assert rows[4]["dp_epsilon_round"] == rows[2]["dp_epsilon"]
    assert f"{eps:.3f} in total (delta 1e-05)" in a.text()


def test_a_killed_site_is_dropped_and_rejoins_from_the_survivors_outer_state(sites_data, tmp_path):
    rendezvous = f"127.0.0.1:{free_port()}"
    store = subprocess.Popen([PYTHON, "-m", "pretrain.cli", "launch", "--serve-rendezvous", rendezvous],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    release, rejoined = tmp_path / "release", tmp_path / "rejoined"
    try:
        steps = ("train.steps=12", "cross_site.timeout_s=30", "cross_site.compress=sign")
        # a waits at step 7 until b asks to rejoin (round 4, at step 8, then serves it the outer state), and
        # at step 9 until b has rejoined, so that b is a live member again for round 5 (step 10)
        a = Site(tmp_path, "a", sites_data, rendezvous, 1, *steps,
                 env={"MMPT_FAULT_HOLD": f"7:{release},9:{rejoined}"})
        b = Site(tmp_path, "b", sites_data, rendezvous, 1, *steps, "checkpoint.every=2",
                 env={"MMPT_FAULT_KILL": "after-step:5"})
        assert b.wait(180) != 0  # killed after step 5
        assert ckpt.latest_tag(b.run / "checkpoints") == "global_step4"
        a.wait_for("site b (stopped: no heartbeat for 15 s) dropped for this round; remaining: a", 90)
        assert a.proc.poll() is None  # the survivor goes on (held at step 7 until b is back)
        b2 = Site(tmp_path, "b", sites_data, rendezvous, 1, *steps, "checkpoint.every=2", resume=True,
                  log="b-again")
        b2.wait_for("asking them for the outer state", 120)
        release.touch()
        b2.wait_for("site b rejoined at round 4", 120)
        rejoined.touch()
        assert a.wait(180) == 0, a.text()[-4000:]
        assert b2.wait(180) == 0, b2.text()[-4000:]
    finally:
        store.send_signal(signal.SIGTERM)
        store.wait(10)
    assert "site b rejoined at round 4" in b2.text()
    sites = {r["step"]: r["cross_site_sites"] for r in read_metrics(a.run) if "cross_site_sites" in r}
    assert sites[4] == 2 and sites[6] == 1 and sites[8] == 1  # b gone; at round 4 it only takes the state
    assert sites[10] == 2  # together again
    (part,) = (b.run / "checkpoints" / "global_step4").glob("*model_states.pt")  # one rank per site
    numel = safe_load(part)["mmpt"]["cross_site"]["synced"].numel()
    b_rows = {r["step"]: r for r in read_metrics(b.run) if "cross_site_bytes" in r}
    assert b_rows[4]["cross_site_bytes"] == 2 * _payload_bytes(numel, "sign")  # two rounds, a bit per value


def test_two_sites_in_two_network_namespaces_exchange_over_a_slow_link(sites_data, tmp_path):
    reason = missing(["ip", "tc"])
    if reason:
        pytest.skip(reason)
    mbit = 1
    with netns_pair("10.79.0") as (host_a, host_b):
        for host in (host_a, host_b):  # each direction: 1 Mbit/s, 4 KB burst (tbf: this kernel has no netem)
            host.limit_rate(mbit)
        before = host_b.link_bytes()
        rendezvous = f"{host_a.addr}:29470"  # a's rank 0 serves it; b reaches it only across the link
        # each site is tp=2 x dp=1 (the other tests' sites are dp=2): rank r of a exchanges its tensor-
        # parallel shard with rank r of b
        steps = ("train.steps=4", "checkpoint.every=4", "cross_site.timeout_s=100", "parallel.tp=2")
        a = Site(tmp_path, "a", sites_data, rendezvous, 2, *steps, netns=host_a.ns)
        b = Site(tmp_path, "b", sites_data, rendezvous, 2, *steps, netns=host_b.ns)
        assert a.wait(240) == 0, a.text()[-4000:]
        assert b.wait(240) == 0, b.text()[-4000:]
        sent, received = (after - start for after, start in zip(host_b.link_bytes(), before))
    assert "site a serves the rendezvous store at 10.79.0.1:29470" in a.text()
    rows = {name: [r for r in read_metrics(site.run) if r.get("step", 1) % 2 == 0 and "cross_site_round" in r]
            for name, site in (("a", a), ("b", b))}  # the round steps (later rows repeat the last round)
    for name in rows:
        assert [r["cross_site_sites"] for r in rows[name]] == [2, 2], rows[name]
    files = sorted(p.name for p in (a.run / "checkpoints" / "global_step4").glob("*optim_states.pt"))
    assert len(files) == 2  # one per tensor-parallel rank
    for name in files:  # each rank's fp32 master weights (its TP shard): equal on both sites after the round
        wa, wb = (safe_load(s.run / "checkpoints" / "global_step4" / name)["optimizer_state_dict"]
                  ["fp32_flat_groups"] for s in (a, b))
        assert len(wa) == len(wb) and all(x.equal(y) for x, y in zip(wa, wb)), name
    # every payload crossed the link: b's went out through it, a's came in through it (plus the store's
    # protocol and heartbeats, a few KB)
    b_bytes, a_bytes = rows["b"][-1]["cross_site_bytes"], rows["a"][-1]["cross_site_bytes"]
    assert sent >= b_bytes and received >= a_bytes, (sent, received, b_bytes, a_bytes)
    assert sent < 1.5 * b_bytes + 200_000, (sent, b_bytes)
    # and the link set the pace: rank 0 of b cannot finish a round before its own payload (half the site's)
    # has gone through at 1 Mbit/s
    per_round = b_bytes / 2
    floor_s = 0.8 * (per_round / 2) * 8 / (mbit * 1e6)
    assert floor_s > 0.1  # the payload is large enough for the bound to mean something
    assert all(r["cross_site_s"] >= floor_s for r in rows["b"]), (floor_s, rows["b"])
