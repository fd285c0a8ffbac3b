"""Who may take part at a rendezvous: one live process per site name, and no more running sites than
`cross_site.sites`. Both mistakes used to run on silently. Two processes with one name (a copied config, a
forgotten `--site`) each took the other's payloads for an earlier life of their own, so one site's steps
were dropped every round. A site beyond `cross_site.sites` was averaged in.

The name is held in `owner/<site>` (outside any generation: a name is a process's, whatever line of rounds
it joins) by a random id per process (`OuterLoop.nonce`). It is given back at the end of a run, taken over
from a holder whose heartbeat stands still (a crashed or requeued site coming back), and checked at every
round, so a process that was taken over stops exchanging instead of posting as someone else. All rank 0.
"""

from __future__ import annotations

from typing import Any

from parallel.cross_site_store import NS, CrossSiteError

Rendezvous = Any  # parallel.cross_site_store.Rendezvous
SELF_NAME = "every site needs its own name (pretrain launch --site NAME, cross_site.site)"


def claim_name(rv: Rendezvous, nonce: str, wait_s: float) -> None:
    """When process `nonce` first enters: hold its site's name, or a CrossSiteError when another process
    holds it and that one's heartbeat moves within `wait_s`."""
    key = f"{NS}/owner/{rv.site}"
    held = rv.store.compare_set(key, "", nonce).decode()
    if held == nonce:
        return
    if rv.liveness.moving([rv.site], wait_s):
        raise CrossSiteError(f"site {rv.site}: another process is running as site {rv.site} at {rv.address} "
                             f"(its heartbeat moves): {SELF_NAME}")
    if rv.store.compare_set(key, held, nonce).decode() != nonce:
        raise CrossSiteError(f"site {rv.site}: another process took the name {rv.site} at {rv.address} just "
                             f"now: {SELF_NAME}")


def holds_name(rv: Rendezvous, nonce: str) -> bool:
    """Whether process `nonce` still holds its site's name (not taken over since)."""
    key = f"{NS}/owner/{rv.site}"
    return rv.store.check(key) and rv.store.get(key).decode() == nonce


def taken_over(rv: Rendezvous, k: int) -> CrossSiteError:
    return CrossSiteError(f"cross-site round {k}: another process took over the name of site {rv.site} at "
                          f"{rv.address} (two processes run as one site, or this one stalled past its "
                          f"heartbeat); this process stops exchanging: {SELF_NAME}")


def give_back_name(rv: Rendezvous, nonce: str) -> None:
    """At the end of a run, while the heartbeat still moves (so nobody takes the name over in between): the
    next process with this name takes it at once."""
    if holds_name(rv, nonce):
        rv.store.delete_key(f"{NS}/owner/{rv.site}")


def check_room(rv: Rendezvous, wait_s: float) -> None:
    """After registering: a CrossSiteError when `cross_site.sites` sites that registered before this one in
    this generation are running (not done, heartbeat moving within `wait_s`). A site that replaces a dead
    one is let in; the refused one is marked done, so nobody waits for its payloads."""
    order = rv.registered()
    mine = order.index(rv.site) if rv.site in order else len(order)
    earlier = [s for s in order[:mine] if not rv.done(s)]
    if len(earlier) < rv.expected_sites:
        return
    running = rv.liveness.moving(earlier, wait_s)
    if len(running) >= rv.expected_sites:
        rv.mark_done()
        raise CrossSiteError(f"site {rv.site} cannot join the sites at {rv.address}: cross_site.sites is "
                             f"{rv.expected_sites} and {', '.join(sorted(running))} are running; set "
                             "cross_site.sites to the number of sites, the same on every site")
