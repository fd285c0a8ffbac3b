"""Where the sites meet: one TCPStore at `cross_site.rendezvous`, and the protocol on top of it.

Every rank of every site holds its own client connection (`cross_site_link.Link`: bounded operations,
errors naming the rendezvous, optional signatures); rank r only ever reads rank r's payloads of the other
sites. Keys, all under `mmpt/xs/`:

- `generation`: the current generation of the sites' outer state, a random id. Every key of a federation's
  rounds lives under `g/<generation>/`, and each site's checkpoint names the generation its outer state
  belongs to, so nothing a store holds from an earlier run, or from a line of rounds this site's state does
  not descend from, is ever taken for this one (a new run on a long-lived store, a site that returns after
  the others finished, a restarted store, a site back from an older checkpoint). A site that cannot join
  the current generation (its state is not the one recorded there and no member is alive to hand over
  theirs) starts a new one from its own state.
- `beat/<site>`: a counter each site's rank 0 bumps from a thread every `BEAT_S`, so the others tell a slow
  site (wait for it) from a dead one (stop waiting). `owner/<site>`: a random id of the process running as
  that site (two live processes with one name would each take the other's payloads for their own), given
  back when it finishes and taken over from a process whose heartbeat has stopped. `config`: the current
  generation's fingerprint (a copy, for tools).

Under `g/<generation>/`:

- `config`: the first site's fingerprint (model architecture, `cross_site.every`, layout); a site whose
  fingerprint differs refuses to join, naming the keys.
- `site/<i>`, `nsites`: registered site names; `done/<site>`: a site that finished training;
  `joining/<site>`: a site waiting for a member's outer state (nobody waits for its payloads meanwhile).
- `r<k>/d/<site>/<rank>`: rank's payload of round k, written once (a site that replays round k after a
  restart averages the bytes its earlier life posted, as every other site does); `r<k>/ready/<site>`: all
  ranks of the site have posted; `r<k>/members`: the sites whose round-k payloads count, set once (first
  writer wins, so every site applies the same average even when sites disagree about who was late).
- `r<k>/synced/<rank>`: the digest of rank's `synced` after round k, recorded by the first site there and
  checked by every other: a site whose state differs stops exchanging and takes a member's state instead.
- `round`: the highest round any site completed here (or brought along when it joined a fresh store);
  `joins` / `served` / `state/<ticket>/<rank>`: a (re)joining site's request for the outer state and the
  answer of the first member of the next round; `released/<site>`: the rounds the site has released (its
  epsilon survives a crash between checkpoints).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from parallel.cross_site_link import (  # noqa: F401  (re-exported: the store's public names)
    BEAT_S,
    NS,
    CrossSiteError,
    Heartbeat,
    Link,
    StoreGone,
    as_link,
    open_store,
    serve,
)
from parallel.cross_site_state import decode_state, encode_state

log = logging.getLogger("mmpt.cross_site")
POLL_S = 0.05
KEEP_ROUNDS = 3
"""Rounds of payloads and digests a site keeps in the store (a late site reads up to this far back)."""


class Behind(Exception):
    """The sites' store is past round k without having settled it: this site is behind the others (they
    came back from a later checkpoint) and must take their state instead of exchanging."""


def new_generation() -> str:
    return secrets.token_hex(8)


def check_fingerprint(store: Any, site: str, mine: dict[str, Any], address: str, ns: str = NS) -> None:
    """Refuse to join when this site's fingerprint differs from the one the first site registered."""
    link = as_link(store, address, 60)
    raw = link.compare_set(f"{ns}/config", "", json.dumps(mine, sort_keys=True))
    try:
        ref = json.loads(raw.decode())
    except ValueError:
        raise CrossSiteError(f"cross-site rendezvous {address}: {ns}/config is not a fingerprint") from None
    if ns != NS:  # the current generation's fingerprint, where tools look for it
        link.set(f"{NS}/config", json.dumps(ref, sort_keys=True))
    diff = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
    if diff:
        detail = "; ".join(f"{k}: {mine.get(k)!r} here, {ref.get(k)!r} there" for k in diff)
        raise CrossSiteError(f"site {site} refuses to join the sites at {address}: {', '.join(diff)} "
                             f"differ ({detail}); every site must train the same model with the same "
                             "cross_site.every and layout")


class Liveness:
    """Rank 0's view of which sites are alive: a site whose heartbeat has not moved for `stale_s` (as seen
    from here; no clocks are compared) is dead until it moves again."""

    def __init__(self, store: Link, stale_s: float) -> None:
        self.store, self.stale_s = store, stale_s
        self.seen: dict[str, tuple[int, float]] = {}

    def beat(self, site: str) -> int:
        return self.store.add(f"{NS}/beat/{site}", 0)

    def alive(self, site: str) -> bool:
        beat = self.beat(site)
        now = time.monotonic()
        value, since = self.seen.get(site, (-1, now))
        if beat != value:
            self.seen[site] = (beat, now)
            return beat > 0
        return now - since < self.stale_s

    def moving(self, sites: list[str], wait_s: float, first: bool = False) -> set[str]:
        """The sites among `sites` whose heartbeat moves within `wait_s` (a fresh view: a site that beat once
        and died does not count); returns once all have moved, or with `first` once any has."""
        start = {s: self.beat(s) for s in sites}
        moved: set[str] = set()
        deadline = time.monotonic() + wait_s
        while sites and len(moved) < len(sites) and time.monotonic() < deadline and not (first and moved):
            time.sleep(POLL_S * 2)
            moved |= {s for s in sites if s not in moved and self.beat(s) != start[s]}
        return moved


class Rendezvous:
    """The store protocol of one rank. Methods marked "rank 0" are called by the site's rank 0 only."""

    def __init__(self, store: Any, site: str, rank: int, address: str, timeout_s: float,
                 expected_sites: int, generation: str = "") -> None:
        self.store = as_link(store, address, timeout_s)
        self.site, self.rank, self.address = site, rank, address
        self.timeout_s, self.expected_sites = timeout_s, expected_sites
        self.liveness = Liveness(self.store, stale_s=min(timeout_s, 15.0))
        self.use(generation)

    # ------------------------------------------------------------------ generations
    def use(self, generation: str) -> None:
        """Work in `generation`'s key space from now on ("" : the bare namespace, unit tests)."""
        self.generation = generation
        self.ns = f"{NS}/g/{generation}" if generation else NS

    def _text(self, key: str) -> str:
        """The store's value at `key` as text, or a CrossSiteError naming the key. What the sites write is
        ASCII: anything else is signed bytes this site cannot read (the others use cross_site.secret_file,
        this one does not) or another program's."""
        data = self.store.get(key)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            hint = ("" if self.store.secret else ": the other sites sign what they write with "
                    "cross_site.secret_file, and this site has none (give every site the same file)")
            raise CrossSiteError(f"cross-site rendezvous {self.address}: {key} holds {len(data)} bytes that "
                                 f"no site of this version writes{hint}") from None

    def _int(self, key: str, default: int = 0) -> int:
        if not self.store.check(key):
            return default
        text = self._text(key)
        try:
            return int(text)
        except ValueError:
            raise CrossSiteError(f"cross-site rendezvous {self.address}: {key} is {text[:40]!r}, not a count "
                                 "(another program writes to this store?)") from None

    def current_generation(self) -> str:
        key = f"{NS}/generation"
        return self._text(key) if self.store.check(key) else ""

    def claim_generation(self, expected: str, new: str) -> str:
        """rank 0: make `new` the current generation if it still is `expected` ("": none); returns the
        current one (`new` when this site won, another site's otherwise)."""
        return self.store.compare_set(f"{NS}/generation", expected, new).decode()

    # ------------------------------------------------------------------ sites
    def register(self) -> None:
        """rank 0: add this site to the list of sites (once per name)."""
        if self.store.add(f"{self.ns}/claim/{self.site}", 1) == 1:
            i = self.store.add(f"{self.ns}/nsites", 1)
            self.store.set(f"{self.ns}/site/{i}", self.site)
        self.store.delete_key(f"{self.ns}/done/{self.site}")

    def registered(self) -> list[str]:
        """The site names registered in this generation, in the order they registered."""
        n = self.store.add(f"{self.ns}/nsites", 0)
        out: list[str] = []
        for i in range(1, n + 1):
            name = self._text(f"{self.ns}/site/{i}")
            if name not in out:
                out.append(name)
        return out

    def sites(self) -> list[str]:
        return sorted(self.registered())

    def done(self, site: str) -> bool:
        return self.store.check(f"{self.ns}/done/{site}")

    def mark_done(self) -> None:
        self.store.set(f"{self.ns}/done/{self.site}", "1")

    def joining(self, site: str) -> bool:
        return self.store.check(f"{self.ns}/joining/{site}")

    def others_alive(self) -> bool:
        """rank 0: whether another registered site is running and can hand over its state."""
        return any(s != self.site and not self.done(s) and not self.joining(s) and self.liveness.alive(s)
                   for s in self.sites())

    def others_done(self) -> bool:
        """rank 0: whether every other registered site has finished (this one may then go on alone)."""
        return all(self.done(s) for s in self.sites() if s != self.site)

    def live_others(self, wait_s: float) -> bool:
        """rank 0, joining: whether another registered site that can hand over its state shows a moving
        heartbeat within `wait_s` (a fresh view: a site that beat once and died must not count)."""
        others = [s for s in self.sites() if s != self.site and not self.done(s) and not self.joining(s)]
        return bool(self.liveness.moving(others, wait_s, first=True))

    # ------------------------------------------------------------------ where the sites are
    def group_round(self) -> int:
        return self._int(f"{self.ns}/round")

    def raise_round(self, k: int) -> None:
        """rank 0: `round` := max(round, k) (a late site finishing an older round must not lower it)."""
        key = f"{self.ns}/round"
        current = self.store.get(key).decode() if self.store.check(key) else ""
        for _ in range(20):
            if current and int(current) >= k:
                return
            got = self.store.compare_set(key, current, str(k)).decode()
            if got == str(k):
                return
            current = got

    def settled(self, k: int) -> bool:
        return self.store.check(f"{self.ns}/r{k}/members")

    def record_digest(self, k: int, value: str) -> str:
        """This rank's `synced` digest after round k: recorded if nobody did yet; returns the recorded one
        (another than `value`: this site's state is not the sites' state)."""
        return self.store.compare_set(f"{self.ns}/r{k}/synced/{self.rank}", "", value).decode()

    def recorded_digest(self, k: int) -> str | None:
        key = f"{self.ns}/r{k}/synced/{self.rank}"
        return self.store.get(key).decode() if self.store.check(key) else None

    def released(self) -> int:
        return self._int(f"{self.ns}/released/{self.site}")

    def set_released(self, n: int) -> None:
        self.store.set(f"{self.ns}/released/{self.site}", str(n))

    # ------------------------------------------------------------------ rounds
    def _key(self, k: int, site: str, rank: int) -> str:
        return f"{self.ns}/r{k}/d/{site}/{rank}"

    def _deliver(self, key: str, value: bytes) -> None:
        """Set `key` and return only once the store holds it. TCPStore's set is not acknowledged: on a slow
        link the value may still be in flight when this rank tells its site it has posted, and another
        rank's "ready" (its own connection) can overtake it. A check on the same connection is answered
        after the set has been applied."""
        self.store.set(key, value)
        if not self.store.check(key):
            raise CrossSiteError(f"cross-site: {key} was set but is not in the store at {self.address}")

    def post(self, k: int, payload: bytes) -> bytes | None:
        """Post this rank's round-k payload; None, or the bytes already there (an earlier life of this site
        posted round k before it crashed: other sites may have averaged those, so they stand)."""
        key = self._key(k, self.site, self.rank)
        if self.store.check(key):
            return self.store.get(key)
        self._deliver(key, payload)
        if k > KEEP_ROUNDS:  # a late site reads up to three rounds back; older ones only cost store memory
            self.store.delete_key(self._key(k - KEEP_ROUNDS, self.site, self.rank))
            self.store.delete_key(f"{self.ns}/r{k - KEEP_ROUNDS - 1}/synced/{self.rank}")
        return None

    def fetch(self, k: int, site: str) -> bytes | None:
        key = self._key(k, site, self.rank)
        return self.store.get(key) if self.store.check(key) else None

    def agree_members(self, k: int, first_round: bool) -> tuple[list[str], list[str]]:
        """rank 0, after every rank of this site posted round k: wait (up to timeout_s) for the other
        live sites, then settle the members of round k (first writer wins). Returns (members, the sites
        this site waited for in vain, each with the reason: heartbeat stopped, or not in time). Raises
        Behind when the store is past round k without having settled it."""
        self.store.set(f"{self.ns}/r{k}/ready/{self.site}", "1")
        members_key = f"{self.ns}/r{k}/members"
        deadline = time.monotonic() + self.timeout_s
        waited: set[str] = set()
        while not self.store.check(members_key):
            at = self.group_round()  # read before members: a site settles k before it raises `round` to k
            if at >= k and not self.store.check(members_key):
                raise Behind(f"the sites are at round {at}")
            registered = self.sites()
            ready = {s for s in registered if self.store.check(f"{self.ns}/r{k}/ready/{s}")}
            pending = {s for s in registered if s not in ready and not self.done(s)
                       and not self.joining(s) and self.liveness.alive(s)}
            waited |= pending
            short = first_round and len(registered) < self.expected_sites
            if not pending and not short:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        proposal = sorted(s for s in self.sites() if self.store.check(f"{self.ns}/r{k}/ready/{s}"))
        members = json.loads(self.store.compare_set(members_key, "", json.dumps(proposal)).decode())
        return members, [f"{s} ({self._why_missing(s)})" for s in sorted(waited - set(members))]

    def _why_missing(self, site: str) -> str:
        if not self.liveness.alive(site):
            return f"stopped: no heartbeat for {self.liveness.stale_s:g} s"
        return f"did not deliver within {self.timeout_s:g} s (cross_site.timeout_s)"

    def finish_round(self, k: int) -> None:
        """rank 0: round k is applied here (a joining site may now ask for the state after it)."""
        self.raise_round(k)

    # ------------------------------------------------------------------ (re)joining
    def pending_join(self) -> int:
        """rank 0: the newest join ticket nobody has served yet (0: none)."""
        joins = self.store.add(f"{self.ns}/joins", 0)
        served = self._int(f"{self.ns}/served")
        return joins if joins > served else 0

    def publish_state(self, ticket: int, state: dict[str, Any]) -> None:
        self._deliver(f"{self.ns}/state/{ticket}/{self.rank}", encode_state(state))

    def mark_served(self, ticket: int) -> None:
        self.store.set(f"{self.ns}/served", str(ticket))

    def ask_state(self) -> int:
        """rank 0: ask the running sites for their outer state (nobody waits for this site's payloads
        until it has it); returns the ticket to wait for."""
        self.store.set(f"{self.ns}/joining/{self.site}", "1")
        return self.store.add(f"{self.ns}/joins", 1)

    def joined(self) -> None:
        """rank 0: this site has a member's state (or gave up asking): wait for its payloads again."""
        self.store.delete_key(f"{self.ns}/joining/{self.site}")

    def wait_state(self, ticket: int) -> int:
        """rank 0: wait up to timeout_s for a member to serve `ticket` (or a later one). Returns the ticket
        served (0 when nobody answered, at once when no other site's heartbeat moves for stale_s)."""
        deadline = time.monotonic() + self.timeout_s
        key = f"{self.ns}/served"
        while time.monotonic() < deadline:
            if self._int(key) >= ticket:
                return self._int(key)
            if not self.others_alive():
                return 0
            time.sleep(POLL_S * 4)
        return 0

    def read_state(self, ticket: int) -> dict[str, Any]:
        """The state a member published for `ticket` (signature checked), decoded; not yet validated."""
        key = f"{self.ns}/state/{ticket}/{self.rank}"
        try:
            return decode_state(self.store.get(key))
        except ValueError as e:
            raise CrossSiteError(f"cross-site rendezvous {self.address}: {key} is {e}") from None

    def wait_others_done(self) -> None:
        """rank 0 of the serving site, at its end: keep the store up until the other sites are done or
        dead (bounded by timeout_s), so their last round still finds it."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not any(s != self.site and not self.done(s) and self.liveness.alive(s) for s in self.sites()):
                return
            time.sleep(POLL_S * 4)
