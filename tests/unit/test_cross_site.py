"""Training across sites, the single-process parts: codecs and error feedback, the clipping bound and
noise of what leaves a site, the epsilon accountant, config validation, and the store protocol (real
TCPStore on loopback: fingerprint refusal, an unreachable rendezvous, dropping a dead site, rejoining)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from launch.rendezvous import free_port
from parallel.cross_site import OuterLoop, contribution
from parallel.cross_site_codec import CHUNK, ErrorFeedback, decode, encode
from parallel.cross_site_privacy import PrivacyLedger, clip_scale
from parallel.cross_site_store import (
    CrossSiteError,
    Heartbeat,
    Rendezvous,
    check_fingerprint,
    open_store,
    serve,
)
from parallel.settings import CrossSiteConfig
from pretrain.config import ConfigError, load_config, validate


# ------------------------------------------------------------------------------------------ codecs
def test_codecs_round_trip_and_sizes():
    torch.manual_seed(0)
    x = torch.randn(3 * CHUNK + 17) * 0.01
    x[5] = 3.0  # an outlier coarsens only its own chunk
    assert torch.equal(decode(encode(x, "none")), x)
    assert torch.allclose(decode(encode(x, "fp16")), x, rtol=1e-3, atol=1e-7)
    got = decode(encode(x, "int8"))
    for c in range(4):  # per-chunk bound: half a quantisation step
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        step = x[sl].abs().max() / 127
        assert (got[sl] - x[sl]).abs().max() <= step / 2 + 1e-7
    assert (got[CHUNK:] - x[CHUNK:]).abs().max() < 1e-3 * 0.5  # other chunks keep a fine scale
    n = x.numel()
    assert len(encode(x, "none")) - len(encode(x, "fp16")) == 2 * n
    assert len(encode(x, "int8")) == len(encode(x, "none")) - 4 * n + n + 4 * 4  # int8 + 4 fp32 scales


def test_int8_error_feedback_delivers_what_rounding_drops():
    """Values under half a quantisation step are sent as 0 every round without feedback; with it, the sum
    of what was sent tracks the sum of the true values to within one step, whatever the number of rounds."""
    x = torch.full((CHUNK,), 1e-3)
    x[0] = 1.0  # scale 1/127: 1e-3 rounds to 0
    plain = sum(decode(encode(x, "int8")) for _ in range(50))
    ef = ErrorFeedback("int8", x.numel())
    sent = sum(ef.encode(x)[1] for _ in range(50))
    truth = 50 * x
    assert plain[1:].abs().max() == 0
    assert (sent - truth).abs().max() <= 1.0 / 127
    assert torch.allclose(sent - truth, -ef.residual, atol=1e-6)  # exactly what is still owed
    assert ErrorFeedback("fp16", 10).residual.numel() == 0



def test_sign_sends_one_bit_per_value_and_each_chunks_mean_magnitude():
    torch.manual_seed(0)
    x = torch.randn(3 * CHUNK + 17) * 0.01
    x[5], x[CHUNK + 1] = 30.0, 0.0
    payload = encode(x, "sign")
    n = x.numel()
    assert len(payload) == 12 + 4 * 4 + -(-n // 8)  # header, 4 fp32 scales, n bits
    got = decode(payload)
    assert torch.equal(got.sign(), torch.where(x >= 0, 1.0, -1.0))  # 0 counts as +
    for c, sl in enumerate((slice(0, CHUNK), slice(CHUNK, 2 * CHUNK), slice(2 * CHUNK, 3 * CHUNK),
                            slice(3 * CHUNK, n))):  # the last chunk's mean is over its 17 real values
        assert torch.allclose(got[sl].abs(), x[sl].abs().mean().expand(got[sl].numel())), c
    assert got[0].abs() > 3 * got[CHUNK:].abs().max()  # the outlier raised its own chunk's scale only
    assert decode(encode(torch.zeros(10), "sign")).abs().max() == 0
    assert ErrorFeedback("sign", 10).residual.numel() == 10


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "sign"])
def test_a_truncated_or_unknown_payload_is_refused_naming_the_problem(codec):
    payload = encode(torch.randn(CHUNK + 3), codec)
    short = len(payload) - 12 - 1  # body bytes left after cutting one
    with pytest.raises(ValueError, match=f"{codec} of {CHUNK + 3} values needs .* got {short}"):
        decode(payload[:-1])
    with pytest.raises(ValueError, match="shorter than its 12-byte header"):
        decode(payload[:5])
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        decode(b"int4" + payload[4:])


def test_a_bad_payload_from_another_site_stops_the_round_naming_site_round_and_rank():
    """What the round does with each other site's payload, through a real store: b posts, a fetches."""
    store = serve(f"127.0.0.1:{free_port()}")
    a, b = _site(store, "a"), _site(store, "b")
    x = torch.randn(CHUNK + 3)
    b.post(1, encode(x, "int8"))
    where = "cross-site round 1: site b's payload for rank 0"
    assert torch.allclose(contribution(a.fetch(1, "b"), x.numel(), where, "h:1"), x, atol=0.05)
    with pytest.raises(CrossSiteError, match=f"{where} has {x.numel()} values, this rank's partition 9"):
        contribution(a.fetch(1, "b"), 9, where, "h:1")  # a partition of another size
    b.post(2, encode(x, "sign")[:-3])  # cut on the way
    with pytest.raises(CrossSiteError, match="round 2: site b's payload for rank 0: .*sign .* got 134"):
        contribution(a.fetch(2, "b"), x.numel(), where.replace("round 1", "round 2"), "h:1")
    with pytest.raises(CrossSiteError, match="round 3: .* is gone from h:1 .*more than 3 rounds behind"):
        contribution(a.fetch(3, "b"), x.numel(), "cross-site round 3: site b's", "h:1")  # never posted

def test_sign_error_feedback_delivers_every_value_on_average():
    """Without feedback a sign code sends every value of a chunk at the chunk's mean magnitude, round after
    round: small values are over-sent, large ones under-sent, for ever. With it, what is still owed grows
    more slowly than the rounds (about as their square root for a constant input), so the average of what
    was sent converges to the true values."""
    torch.manual_seed(1)
    x = torch.linspace(1e-3, 1.0, CHUNK) * torch.where(torch.rand(CHUNK) < 0.5, -1.0, 1.0)
    plain = (decode(encode(x, "sign")) - x).abs().max()  # the same error every round: 0.5 here
    ef = ErrorFeedback("sign", x.numel())
    sent, err = torch.zeros_like(x), {}
    for r in range(1, 401):
        sent += ef.encode(x)[1]
        if r in (100, 400):
            err[r] = (sent / r - x).abs().max()
            assert torch.allclose(sent - r * x, -ef.residual, atol=1e-3)  # exactly what is still owed
    assert plain > 0.4 and err[400] < 0.1 * plain
    assert err[400] < 0.6 * err[100]  # still converging: 4x the rounds, about half the error

# ------------------------------------------------------------------------------------------ privacy
def _loop(**cfg) -> OuterLoop:
    """The parts of an OuterLoop `_release` uses (single process: the site is this rank)."""
    loop = OuterLoop.__new__(OuterLoop)
    loop.cfg, loop.device, loop.rank = CrossSiteConfig(site="s", **cfg), torch.device("cpu"), 0
    return loop


@pytest.mark.parametrize("norm", [0.5, 3.0, 300.0])
def test_what_leaves_a_site_is_clipped_to_dp_clip(norm):
    torch.manual_seed(1)
    delta = torch.randn(5000)
    delta *= norm / delta.norm()
    out = _loop(dp_clip=1.0)._release(delta.clone(), 1)
    assert out.norm() <= 1.0 + 1e-5
    if norm <= 1.0:
        assert torch.equal(out, delta)  # under the bound nothing changes
    else:
        assert torch.allclose(out / out.norm(), delta / delta.norm(), atol=1e-6)  # direction kept


def test_clip_scale_over_several_ranks_bounds_the_whole_site():
    """Each rank scales by the factor of the site's summed squares, so the concatenation is bounded."""
    parts = [torch.randn(100) * 3, torch.randn(50) * 7]
    scale = clip_scale(sum(float(p.pow(2).sum()) for p in parts), 2.0)
    assert torch.cat([p * scale for p in parts]).norm() == pytest.approx(2.0, rel=1e-5)
    assert clip_scale(0.25, 1.0) == 1.0 and clip_scale(123.0, 0.0) == 1.0


def test_noise_has_the_configured_scale_and_is_never_reproduced():
    """Reproducible noise could be regenerated and subtracted by whoever knows how: the same (site, round,
    rank) must give other noise every time (test_cross_site_numerics checks it against public seeds)."""
    zero = torch.zeros(20000)
    a1 = _loop(dp_clip=2.0, dp_noise=0.5)._release(zero, 1)
    assert a1.std().item() == pytest.approx(1.0, rel=0.05)  # dp_noise x dp_clip
    again = _loop(dp_clip=2.0, dp_noise=0.5)._release(zero, 1)
    assert torch.corrcoef(torch.stack([a1, again]))[0, 1].abs() < 0.05  # same site, round, rank: new noise


def test_epsilon_comes_from_opacus_and_grows_with_rounds():
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger(noise=1.0, delta=1e-5)
    per_round = [ledger.record_round() for _ in range(3)]
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert per_round[-1][1] == pytest.approx(acc.get_epsilon(1e-5))
    assert per_round[0][0] == per_round[2][0] == pytest.approx(per_round[0][1])
    assert per_round[0][1] < per_round[1][1] < per_round[2][1]
    assert PrivacyLedger(noise=4.0, delta=1e-5, rounds=3).total() < per_round[-1][1]


# ------------------------------------------------------------------------------------------ config
def test_every_codec_is_a_config_choice_and_every_choice_a_codec():
    """The config's choices are a literal (config loading does not import torch): they must not drift."""
    from parallel.cross_site_codec import CODECS
    from pretrain.config.schema import CHOICES

    assert CHOICES["cross_site.compress"] == CODECS
    cfg = load_config(None, ["run.dir=x", "cross_site.sites=2", "cross_site.site=a",
                             "cross_site.rendezvous=127.0.0.1:29400", "cross_site.compress=sign"])
    assert cfg.cross_site.compress == "sign"


def test_cross_site_is_off_by_default_and_its_problems_name_their_keys():
    cfg = load_config(None, ["run.dir=x"])
    validate(cfg)  # sites=0: the section is not checked
    with pytest.raises(ConfigError) as e:  # loading validates, all problems at once
        load_config(None, ["run.dir=x", "cross_site.sites=2", "cross_site.rendezvous=nohost",
                           "cross_site.every=0", "cross_site.dp_noise=1.0", "cross_site.timeout_s=900",
                           "parallel.zero_stage=2", "cross_site.outer_momentum=1.0",
                           "cross_site.compress=int4"])
    msg = str(e.value)
    for key in ("cross_site.site must name", "cross_site.rendezvous must be HOST:PORT", "cross_site.every",
                "cross_site.dp_noise > 0 needs cross_site.dp_clip", "cross_site.timeout_s (900) must be <",
                "parallel.zero_stage=3", "cross_site.outer_momentum", "cross_site.compress: 'int4'"):
        assert key in msg, key
    ok = load_config(None, ["run.dir=x", "cross_site.sites=2", 'cross_site.site="0"',
                            "cross_site.rendezvous=127.0.0.1:29400"])
    validate(ok)


# ------------------------------------------------------------------------------------------ store
def test_unreachable_rendezvous_fails_within_the_timeout_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(CrossSiteError, match=f"rendezvous {address}: nothing accepted.*within 2 s"):
        open_store(address, 2, may_host=False)
    assert time.monotonic() - t0 < 5


def test_a_site_with_another_every_refuses_to_join_naming_the_key():
    address = f"127.0.0.1:{free_port()}"
    store, hosting = open_store(address, 10, may_host=True)
    assert hosting
    check_fingerprint(store, "a", {"cross_site.every": 2, "model.embed_dim": 16}, address)
    check_fingerprint(store, "b", {"cross_site.every": 2, "model.embed_dim": 16}, address)  # same: joins
    client, hosting = open_store(address, 10, may_host=True)  # something answers: a client
    assert not hosting
    with pytest.raises(CrossSiteError, match=r"site c refuses to join .*: cross_site.every differ "
                                             r"\(cross_site.every: 3 here, 2 there\)"):
        check_fingerprint(client, "c", {"cross_site.every": 3, "model.embed_dim": 16}, address)


def _site(store, name: str, timeout_s: float = 2.0) -> Rendezvous:
    rv = Rendezvous(store, name, 0, "test", timeout_s, expected_sites=2)
    rv.register()
    return rv


def test_a_dead_site_is_dropped_a_slow_one_is_waited_for_and_all_agree_on_members():
    store = serve(f"127.0.0.1:{free_port()}")
    a, b, c = _site(store, "a"), _site(store, "b"), _site(store, "c")
    store.add("mmpt/xs/beat/c", 5)  # c beat once and then died: dropped when its beat is stale (2 s)
    beating = threading.Event()

    def beat_b():  # b is alive but slow: a waits for it
        while not beating.is_set():
            store.add("mmpt/xs/beat/b", 1)
            time.sleep(0.1)

    threading.Thread(target=beat_b, daemon=True).start()
    threading.Timer(1.0, lambda: store.set("mmpt/xs/r1/ready/b", "1")).start()
    t0 = time.monotonic()
    members, missing = a.agree_members(1, first_round=True)
    beating.set()
    assert members == ["a", "b"] and missing == ["c (stopped: no heartbeat for 2 s)"]
    assert 1.0 <= time.monotonic() - t0 < 4
    assert b.agree_members(1, first_round=True) == (["a", "b"], [])  # the settled members, not its own view
    # a late site finds the members settled without it
    assert c.agree_members(1, first_round=True)[0] == ["a", "b"]


def test_heartbeat_stop_waits_for_a_store_call_in_flight():
    """A beat thread left inside a store call when the process exits aborts it (SIGABRT after success)."""
    address = f"127.0.0.1:{free_port()}"
    store = serve(address)
    beat = Heartbeat(address, "a", timeout_s=10)
    inside = threading.Event()

    class Slow:  # the beat connection, with every call taking 0.5 s
        def add(self, key, n):
            inside.set()
            time.sleep(0.5)
            return store.add(key, n)

    beat.store = Slow()
    assert inside.wait(5)  # the thread is in a call now
    beat.stop()
    assert not beat._thread.is_alive()
    n = store.add("mmpt/xs/beat/a", 0)
    time.sleep(1.2)  # more than two beats
    assert store.add("mmpt/xs/beat/a", 0) == n  # stopped


def test_a_rejoining_site_gets_the_state_a_member_publishes():
    store = serve(f"127.0.0.1:{free_port()}")
    a = _site(store, "a")
    store.add("mmpt/xs/beat/a", 1)  # a is running (a joiner stops waiting when no other site beats)
    a.finish_round(4)
    late = Rendezvous(store, "b", 0, "test", 5.0, expected_sites=2)
    assert late.group_round() == 4

    def serve_it():
        while not (ticket := a.pending_join()):
            time.sleep(0.05)
        a.publish_state(ticket, {"round": 5, "synced": torch.arange(3.0), "momentum": torch.ones(3)})
        a.mark_served(ticket)

    threading.Thread(target=serve_it, daemon=True).start()
    ticket = late.wait_state(late.ask_state())
    state = late.read_state(ticket)
    assert state["round"] == 5 and torch.equal(state["synced"], torch.arange(3.0))
    assert a.pending_join() == 0


def test_launch_site_flags_become_overrides():
    import argparse

    from launch import cli as launch_cli

    parser = argparse.ArgumentParser()
    launch_cli.register(parser.add_subparsers(), None, None)  # type: ignore[arg-type]
    args = parser.parse_args(["launch", "--launcher", "torchrun", "--site", "0", "--rendezvous", "h:29400",
                              "--", "train", "cross_site.site=x"])
    plan = launch_cli.plan_from_args(args, {})
    assert plan.train_args[-2:] == ('cross_site.site="0"', 'cross_site.rendezvous="h:29400"')
