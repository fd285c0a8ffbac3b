"""How a site enters the sites' outer state, and re-enters it when it finds itself behind.

The rule: a site never averages a payload computed against another `synced` than its own. Every round's
keys belong to one *generation* of the outer state (cross_site_store), and every site records a digest of
each rank's `synced` after each round. When a site starts (fresh, or with the outer state of its
checkpoint), rank 0 surveys the store and one of three things happens:

- continue: its state is the generation's state at its round (same generation and digests, or a store
  that holds nothing yet): it registers and exchanges from the next round on;
- adopt: it is behind, from another generation, or its digests differ, and a member is alive: it asks for
  the members' outer state, which the first member of their next round publishes; every rank checks it
  (keys, sizes, dtype, finite values, round, and the digest the sites recorded) before writing it;
- fork: nobody alive can hand over a state: it goes on from its own outer state as a new generation (the
  rounds already in the store are never reused), and sites that come later take its state.

The same adopt-or-fork path runs mid-run when a site finds, at a round, that the sites are past it (they
came back from later checkpoints than this one) or that its digest after the last round differs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from parallel import cross_site_names as names
from parallel import groups
from parallel.consensus import failures_by_rank, from_rank0, on_rank0, sum_over_ranks
from parallel.cross_site_state import digest, state_problem
from parallel.cross_site_store import (
    CrossSiteError,
    Heartbeat,
    StoreGone,
    check_fingerprint,
    new_generation,
)

OuterLoop = Any  # parallel.cross_site.OuterLoop, which imports this module (no cycle)

log = logging.getLogger("mmpt.cross_site")
T = TypeVar("T")
NAME_WAIT_S = 5.0
"""How long a heartbeat must stand still before its site counts as gone for taking over its name or its
place among cross_site.sites (at most the liveness window, min(cross_site.timeout_s, 15 s))."""


# ------------------------------------------------------------------ rank agreement
def rank0(fn: Callable[[], T], wait: bool = False) -> T:
    """`fn()` run on rank 0, its result on every rank; a CrossSiteError there is raised on every rank.
    `wait`: fn may take long (it waits for other sites): the other ranks poll instead of holding one
    collective open past the process group's timeout."""
    if wait:
        result, error = on_rank0(fn, poll_s=0.02)
    elif groups.rank() == 0:
        try:
            result, error = fn(), None
        except Exception as e:  # shared with the other ranks below
            result, error = None, e
    else:
        result, error = None, None
    shared = from_rank0((result, None if error is None else (isinstance(error, StoreGone), str(error))))
    if shared[1] is not None:
        if error is not None and not isinstance(error, CrossSiteError):
            raise error
        gone, msg = shared[1]
        raise (StoreGone if gone else CrossSiteError)(msg)
    return shared[0]


def every_rank(fn: Callable[[], T], loop: OuterLoop,
               count: Callable[[T], float] | None = None) -> tuple[T, float]:
    """(`fn()` on this rank, the sum over the site's ranks of `count(result)`): one all-reduce that also
    makes an error on any rank fail every rank together (no rank left in a later collective): this rank
    re-raises its own error, the others a CrossSiteError naming the rendezvous."""
    try:
        out, err = fn(), None
    except Exception as e:  # any error: the other ranks must not be left waiting in the sum below
        out, err = None, e
    n = 0.0 if err is not None or count is None else float(count(out))  # type: ignore[arg-type]
    failed, gone, total = sum_over_ranks([err is not None, isinstance(err, StoreGone), n], loop.device)
    if failed:
        if err is not None:
            raise err
        raise (StoreGone if gone else CrossSiteError)(
            f"cross-site: another rank of site {loop.cfg.site} failed at the rendezvous "
            f"{loop.cfg.rendezvous} (its own log line says why)")
    return out, total  # type: ignore[return-value]


# ------------------------------------------------------------------ join
def join(loop: OuterLoop, first: bool = True) -> None:
    """Before the first step (`first`), or when a round found this site behind: settle it in the store's
    current generation (module docstring)."""
    loop.ledger.rounds = int(rank0(lambda: _releases_so_far(loop)))
    deferred = False
    for _ in range(3):
        plan = rank0(lambda: _survey(loop), wait=True)
        loop.rv.use(plan["generation"])
        action = plan["action"]
        if action == "check":
            action = "continue" if _same_state(loop) else ("adopt" if plan["alive"] else "defer")
            plan["why"] = "its outer state is not the one the sites recorded for that round"
        if action == "continue":
            rank0(lambda: _enter(loop), wait=True)
            break
        if action == "defer" and first:
            # nobody alive yet to hand over the recorded state: another site may just be starting (it
            # recorded its digests but has not registered). Decide at the first round: take theirs then,
            # or go on alone as a new generation.
            rank0(lambda: _enter(loop, at_own_state=False), wait=True)
            deferred = True
            break
        if action == "adopt" and adopt(loop, plan["why"]):
            break
        if fork(loop, plan["why"]):
            break
        time.sleep(1.0)  # another site started a generation just now: join that one
    else:
        raise CrossSiteError(f"site {loop.cfg.site} could not settle at the rendezvous "
                             f"{loop.cfg.rendezvous}: other sites kept starting new generations of the outer "
                             "state")
    loop.generation, loop.diverged = loop.rv.generation, deferred
    groups.barrier()


def _releases_so_far(loop: OuterLoop) -> int:
    """rank 0: rounds this site released, as the most of its checkpoint, its run directory's record and
    the store's count (rounds released after the last checkpoint still count)."""
    n = max(loop.ledger.rounds, loop.releases.count())
    if loop.generation:
        here = loop.rv.generation
        loop.rv.use(loop.generation)
        n = max(n, loop.rv.released())
        loop.rv.use(here)
    return n


def _survey(loop: OuterLoop) -> dict[str, Any]:
    """rank 0: the current generation (set to this site's, or a new one, when the store holds none), and
    what to do: check (digests at this site's round), adopt, or fork."""
    rv, mine, r = loop.rv, loop.generation, loop.round
    current = rv.current_generation()
    seeded = False
    if not current:
        want = mine or new_generation()
        current = rv.claim_generation("", want)
        seeded = current == want
    rv.use(current)
    alive = rv.live_others(rv.liveness.stale_s)
    at = rv.group_round()
    try:
        check_fingerprint(rv.store, loop.cfg.site, loop.fingerprint, loop.cfg.rendezvous, rv.ns)
    except StoreGone:
        raise
    except CrossSiteError:
        if alive:
            raise
        return {"generation": current, "alive": False, "action": "fork",
                "why": "the sites recorded at the store trained another configuration and are gone"}
    plan = {"generation": current, "alive": alive, "action": "check", "why": ""}
    if not (mine == current or seeded or (not mine and r == at)):
        plan["why"] = (f"its outer state (generation {mine or 'none'}) is not of the sites' line of rounds "
                       f"(generation {current}, round {at})")
        plan["action"] = "adopt" if alive else "fork"
    elif r < at:
        plan["why"] = f"the sites are at round {at}"
        plan["action"] = "adopt" if alive else "fork"
    return plan


def _same_state(loop: OuterLoop) -> bool:
    """Every rank: record (or compare with the recorded) digest of its `synced` at this site's round."""
    mine = digest(loop.synced)
    _, differ = every_rank(lambda: loop.rv.record_digest(loop.round, mine) != mine, loop, count=float)
    return not differ


def _enter(loop: OuterLoop, at_own_state: bool = True) -> None:
    """rank 0: register in the current generation and beat; `at_own_state`: this site goes on from its own
    state, so the generation is at least at its round (not so for a site about to take a member's)."""
    rv = loop.rv
    wait_s = min(rv.liveness.stale_s, NAME_WAIT_S)
    if loop.heartbeat is None:  # this process enters for the first time
        names.claim_name(rv, loop.nonce, wait_s)
    rv.register()
    try:
        names.check_room(rv, wait_s)
    except CrossSiteError:
        names.give_back_name(rv, loop.nonce)
        raise
    rv.joined()
    if at_own_state:
        rv.raise_round(loop.round)
    if loop.ledger.rounds:
        rv.set_released(loop.ledger.rounds)
    if loop.heartbeat is None:
        loop.heartbeat = Heartbeat(loop.cfg.rendezvous, loop.cfg.site, loop.cfg.timeout_s)


# ------------------------------------------------------------------ adopt / fork
def adopt(loop: OuterLoop, why: str) -> bool:
    """Every rank: ask the running sites for their outer state and take it; False when nobody served it
    within cross_site.timeout_s (or no other site's heartbeat moves)."""
    c = loop.cfg

    def ask() -> int:
        _enter(loop, at_own_state=False)
        log.info("cross-site: site %s is at round %d and %s; asking them for the outer state", c.site,
                 loop.round, why)
        ticket = loop.rv.ask_state()
        served = loop.rv.wait_state(ticket)
        if not served:
            loop.rv.joined()
        return served

    ticket = rank0(ask, wait=True)
    if not ticket:
        return False
    take(loop, ticket)
    rank0(loop.rv.joined)
    if groups.rank() == 0:
        log.info("cross-site: site %s rejoined at round %d", c.site, loop.round)
    return True


def take(loop: OuterLoop, ticket: int) -> None:
    """Every rank: read the state a member published for `ticket`, check it, and write it into the
    weights; a state that fails a check on any rank is refused on every rank, naming what is wrong."""
    rv, state, problem = loop.rv, None, None
    try:
        state = rv.read_state(ticket)
        problem = state_problem(state, loop.synced.numel(), 1, rv.group_round() + 1)
        if problem is None and rv.recorded_digest(state["round"]) != digest(state["synced"]):
            problem = ("has a synced whose digest is not the one the sites recorded after round "
                       f"{state['round']}")
    except CrossSiteError as e:
        problem = str(e)
    failures = failures_by_rank(None if problem is None else f"the state {problem}")
    if failures:
        raise CrossSiteError(f"site {loop.cfg.site} refuses the outer state a member published at "
                             f"{loop.cfg.rendezvous} (ticket {ticket}): {'; '.join(failures)}")
    assert state is not None
    loop._adopt(state)


def fork(loop: OuterLoop, why: str) -> bool:
    """Every rank: go on from this site's own outer state as a new generation of the sites' state (False:
    another site started one just now; join that instead)."""
    rv, c = loop.rv, loop.cfg

    def claim() -> str:
        before = rv.generation
        new = new_generation()
        if rv.claim_generation(before, new) != new:
            return ""
        rv.joined()
        rv.mark_done()  # nobody in the old generation waits for this site any more
        rv.use(new)
        return new

    new = rank0(claim)
    if not new:
        return False
    rv.use(new)
    _same_state(loop)  # a new key space: records this site's digests
    rank0(lambda: (check_fingerprint(rv.store, c.site, loop.fingerprint, c.rendezvous, rv.ns), _enter(loop)),
          wait=True)
    if groups.rank() == 0:
        log.warning("cross-site: no running site can hand over the outer state (%s); site %s goes on from "
                    "its own outer state (round %d) as a new generation %s at %s: the rounds already in the "
                    "store are not reused", why, c.site, loop.round, new, c.rendezvous)
    return True


def catch_up(loop: OuterLoop, k: int, why: str, t0: float) -> dict[str, Any]:
    """Every rank, at round k: the sites are past this one or its state differs from theirs: instead of
    exchanging, enter the sites' state again as when joining (take a member's, or go on alone as a new
    generation when nobody can hand one over)."""
    if groups.rank() == 0:
        log.warning("cross-site round %d: site %s does not exchange this round: %s", k, loop.cfg.site, why)
    join(loop, first=False)
    row = {"cross_site_round": loop.round, "cross_site_sites": 0, "cross_site_bytes": loop.bytes_site,
           "cross_site_s": round(time.monotonic() - t0, 3)}
    loop.last = row
    return row


# ------------------------------------------------------------------ leave
def leave(loop: OuterLoop) -> None:
    """rank 0, at the end of training: mark this site done, give its name back (before the heartbeat stops:
    nobody takes it over in between), stop the heartbeat and, on the site serving the store, keep it up
    until the other sites are done or dead (bounded by cross_site.timeout_s), so their last round still
    finds it. A store that fails by then only costs a warning: this site's training is complete."""
    c = loop.cfg
    try:
        if not loop.solo:
            loop.rv.mark_done()
    except CrossSiteError as e:
        log.warning("cross-site: site %s could not mark itself done: %s", c.site, e)
    try:
        if not loop.solo:
            names.give_back_name(loop.rv, loop.nonce)
    except CrossSiteError as e:
        log.warning("cross-site: site %s could not give its name back: %s", c.site, e)
    if loop.heartbeat is not None:
        loop.heartbeat.stop()
    try:
        if loop.hosting:
            loop.rv.wait_others_done()
    except CrossSiteError as e:
        log.warning("cross-site: %s", e)
