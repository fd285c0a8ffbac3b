"""Training across sites over time: generations and digests. No round settled in another run or another life
of a site is reused, no site averages payloads computed against another `synced` than its own, and sites
that come back from different checkpoints meet again (tests/xsites.py: real OuterLoops on a real store)."""

from __future__ import annotations

import gc
import threading
import time

import torch
from xsites import N, asked, checkpoint, exchange, site, stop, together, train

from launch.rendezvous import free_port
from parallel.cross_site_store import Heartbeat, serve


def test_a_new_run_on_a_long_lived_store_never_reuses_the_last_runs_rounds():
    """The store outlives run 1 (`--serve-rendezvous`); run 2's rounds are its own: a may settle round 1
    before b has posted it, but never with b's payload of run 1."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    for k in range(2):
        train(a, 100 + k)
        train(b, 200 + k)
        together(a._round, b._round)
    together(a.finish, b.finish)
    first = a.rv.generation
    a2, b2 = site(address, "a"), site(address, "b")
    together(a2.join, b2.join)
    train(a2, 300)
    train(b2, 400)
    ra, rb = together(a2._round, lambda: (time.sleep(0.5), b2._round())[1])  # a first: never in lockstep
    assert torch.equal(a2.synced, b2.synced)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2
    assert a2.rv.generation == b2.rv.generation != first
    stop(a2, b2)
    del server


def test_a_site_back_from_an_older_checkpoint_after_the_others_ended_goes_on_as_a_new_generation(caplog):
    """b crashed after round 4 with a checkpoint of round 2; a went on and finished at round 6. b's requeue
    must neither fail on payloads long gone nor mix in rounds it does not descend from: it trains on from its
    own outer state, in a generation of its own."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a", timeout_s=2), site(address, "b", timeout_s=2)
    together(a.join, b.join)
    ckpt, w_ckpt = exchange(a, b, 4, keep_b_at=2)
    stop(b)
    for k in (5, 6):
        train(a, k)
        a._round()
    a.finish()
    b2 = site(address, "b", w_ckpt, timeout_s=2, state=ckpt)
    b2.join()
    before = b2.synced.clone()
    train(b2, 103)
    row = b2._round()
    assert row["cross_site_round"] == 3 and row["cross_site_sites"] == 1
    assert torch.equal(b2.synced, b2.partition.read()) and not torch.equal(b2.synced, before)
    assert b2.rv.generation != a.rv.generation
    assert "goes on from its own outer state (round 2) as a new generation" in caplog.text
    # a comes back from its last checkpoint (round 6, the old generation): it takes b's line, at b's round
    a2 = site(address, "a", a.partition.read(), timeout_s=2, state=checkpoint(a))
    joining = threading.Thread(target=a2.join, daemon=True)
    joining.start()
    asked(b2)
    train(b2, 104)
    b2._round()  # round 4 of b's generation: serves a
    joining.join(10)
    assert a2.round == 4 and torch.equal(a2.synced, b2.synced)
    train(a2, 7)
    train(b2, 105)
    ra, rb = together(a2._round, b2._round)
    assert ra["cross_site_round"] == rb["cross_site_round"] == 5 and torch.equal(a2.synced, b2.synced)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2
    stop(a, b2, a2)
    del server


def test_sites_resumed_at_different_rounds_on_a_fresh_store_meet_again():
    """The store's host restarted; a comes back from round 5, b from round 3. b takes a's state at a's next
    round instead of both timing out every round; then both exchange, equal."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    ckpt_b, w_b = exchange(a, b, 5, keep_b_at=3, b_seed=10)
    ckpt_a, w_a = checkpoint(a), a.partition.read()
    stop(a, b)
    del server
    gc.collect()
    address = f"127.0.0.1:{free_port()}"  # the restarted store (empty)
    server = serve(address)
    a2 = site(address, "a", w_a, state=ckpt_a)
    b2 = site(address, "b", w_b, state=ckpt_b)
    a2.join()
    b2_join = threading.Thread(target=b2.join, daemon=True)
    b2_join.start()
    asked(a2)
    train(a2, 6)
    t0 = time.monotonic()
    a2._round()  # round 6: serves b2 the state
    b2_join.join(10)
    assert not b2_join.is_alive() and b2.round == 6 and torch.equal(a2.synced, b2.synced)
    train(a2, 7)
    train(b2, 17)
    ra, rb = together(a2._round, b2._round)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2 and torch.equal(a2.synced, b2.synced)
    assert time.monotonic() - t0 < 3 * 3  # nobody waited out cross_site.timeout_s round after round
    stop(a2, b2)
    del server


def test_a_site_ahead_of_the_one_that_seeded_a_fresh_store_hands_it_its_state():
    """The other order: b (round 3) reaches the restarted store first and is exchanging alone when a (round
    5) arrives. At its next round b sees the sites are past it and takes a's state."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    ckpt_b, w_b = exchange(a, b, 5, keep_b_at=3, b_seed=10)
    ckpt_a, w_a = checkpoint(a), a.partition.read()
    stop(a, b)
    address = f"127.0.0.1:{free_port()}"
    server2 = serve(address)
    b2 = site(address, "b", w_b, state=ckpt_b)
    b2.join()
    a2 = site(address, "a", w_a, state=ckpt_a)
    a2.join()
    train(a2, 6)
    train(b2, 16)
    ra, rb = together(a2._round, b2._round)  # b2: round 4 -> behind, takes a's round 6
    assert ra["cross_site_round"] == rb["cross_site_round"] == 6 and torch.equal(a2.synced, b2.synced)
    train(a2, 7)
    train(b2, 17)
    ra, rb = together(a2._round, b2._round)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2 and torch.equal(a2.synced, b2.synced)
    stop(a2, b2)
    del server, server2


def test_a_site_replaying_a_round_it_had_posted_before_it_crashed_stays_equal():
    """b dies after posting round 2 (ready), and is back from its round-1 checkpoint before a settles round
    2. a may average b's old bytes; b must too (its new inner steps differ by GPU nondeterminism), or the
    two differ for good."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a", timeout_s=5), site(address, "b", timeout_s=5)
    together(a.join, b.join)
    train(a, 1)
    train(b, 2)
    together(a._round, b._round)
    ckpt, w_ckpt = checkpoint(b), b.partition.read()
    train(b, 4)  # round 2 of b's first life: posted and ready, then b dies
    payload, _ = b.feedback.encode(b._release(b.synced - b.partition.read(), 2))
    b.rv.post(2, payload)
    b.rv.store.set(f"{b.rv.ns}/r2/ready/b", "1")
    stop(b)
    b2 = site(address, "b", w_ckpt, timeout_s=5, state=ckpt)
    b2.join()
    train(a, 3)
    a._round()  # settles round 2 with b's first-life payload
    train(b2, 4)
    b2.partition.w += 1e-6 * torch.randn(N)
    b2._round()
    assert torch.equal(a.synced, b2.synced)
    train(a, 5)
    train(b2, 6)
    together(a._round, b2._round)
    assert torch.equal(a.synced, b2.synced)
    stop(a, b2)
    del server


def test_a_resumed_site_without_outer_state_takes_the_members_state_instead_of_its_weights():
    """`start.universal` or another layout: the outer state starts from the site's own weights, which are
    not the sites' `synced`; its digest says so and it takes a member's state."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    for k in (1, 2):
        train(a, k)
        train(b, 10 + k)
        together(a._round, b._round)
    stop(b)
    b2 = site(address, "b", b.partition.read() + 0.5)  # round 0, no generation, other weights
    joining = threading.Thread(target=b2.join, daemon=True)
    joining.start()
    asked(a)
    train(a, 3)
    a._round()
    joining.join(10)
    assert b2.round == 3 and torch.equal(b2.synced, a.synced) and torch.equal(b2.partition.w, a.synced)
    stop(a, b2)
    del server


def test_a_site_at_the_same_round_with_another_state_takes_the_members_state():
    """Same generation, same round, other weights (a store restarted under two sites whose states had
    drifted apart): the digests differ, so the second site takes the first's state instead of averaging
    payloads computed against another `synced`."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a, b = site(address, "a"), site(address, "b")
    together(a.join, b.join)
    for k in (1, 2):
        train(a, k)
        train(b, 10 + k)
        together(a._round, b._round)
    ckpt_a, w_a = checkpoint(a), a.partition.read()
    ckpt_b, w_b = checkpoint(b), b.partition.read()
    ckpt_b["synced"] = ckpt_b["synced"] + 1e-3
    stop(a, b)
    address = f"127.0.0.1:{free_port()}"
    server2 = serve(address)
    a2 = site(address, "a", w_a, state=ckpt_a)
    a2.join()
    b2 = site(address, "b", w_b, state=ckpt_b)
    joining = threading.Thread(target=b2.join, daemon=True)
    joining.start()
    asked(a2)
    train(a2, 3)
    a2._round()
    joining.join(10)
    assert b2.round == 3 and torch.equal(b2.synced, a2.synced)
    train(a2, 4)
    train(b2, 14)
    together(a2._round, b2._round)
    assert torch.equal(b2.synced, a2.synced)
    stop(a2, b2)
    del server, server2


def test_a_site_that_finds_nobody_alive_at_its_start_decides_at_its_first_round():
    """b starts while a has recorded its state but shows no heartbeat yet (a is still starting): b must not
    split off into a generation of its own at once. It registers, and at its first round takes a's state."""
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    a = site(address, "a")
    a.join()
    a.heartbeat.stop()  # a's beats stall for longer than min(timeout_s, 15 s)
    b = site(address, "b", torch.full((N,), 0.5))  # another state of round 0
    b.join()
    assert b.rv.generation == a.rv.generation and b.diverged
    a.heartbeat = Heartbeat(address, "a", 3)  # a is running now
    train(a, 1)
    train(b, 2)
    ra, rb = together(a._round, b._round)  # b takes a's state of round 1 instead of exchanging
    assert rb["cross_site_sites"] == 0 and b.round == 1 and torch.equal(a.synced, b.synced)
    train(a, 3)
    train(b, 4)
    ra, rb = together(a._round, b._round)
    assert ra["cross_site_sites"] == rb["cross_site_sites"] == 2 and torch.equal(a.synced, b.synced)
    stop(a, b)
    del server


def test_three_sites_average_in_one_order_and_stay_bitwise_equal():
    address = f"127.0.0.1:{free_port()}"
    server = serve(address)
    sites = [site(address, s, sites=3) for s in "abc"]
    together(*(s.join for s in sites))
    for k in range(3):
        for i, s in enumerate(sites):
            g = torch.Generator().manual_seed(10 * k + i)
            s.partition.w += torch.randn(N, generator=g) * 10.0 ** torch.randint(-4, 4, (N,), generator=g)
        together(*(s._round for s in sites))
        assert torch.equal(sites[0].synced, sites[1].synced) and torch.equal(sites[0].synced, sites[2].synced)
    stop(*sites)
    del server
