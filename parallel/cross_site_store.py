"""Where the sites meet: one TCPStore at `cross_site.rendezvous`, and the protocol on top of it.

Every rank of every site holds its own client connection; rank r only ever reads rank r's payloads of
the other sites. Keys (all under `mmpt/xs/`):

- `config`: the first site's fingerprint (model architecture, `cross_site.every`, layout); a site whose
  fingerprint differs refuses to join, naming the keys.
- `site/<i>`, `nsites`: registered site names; `beat/<site>`: a counter each site's rank 0 bumps from a
  thread every `BEAT_S`, so the others tell a slow site (wait for it) from a dead one (stop waiting);
  `done/<site>`: a site that finished training.
- `r<k>/d/<site>/<rank>`: rank's payload of round k; `r<k>/ready/<site>`: all ranks of the site have
  posted; `r<k>/members`: the sites whose round-k payloads count, set once (first writer wins, so every
  site applies the same average even when sites disagree about who was late).
- `round`: the last completed round; `joins` / `served` / `state/<ticket>/<rank>`: a (re)joining site's
  request for the outer state and the survivors' answer.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from launch.env import RendezvousError
from launch.rendezvous import parse_address, serve_store, wait_for_port

log = logging.getLogger("mmpt.cross_site")
NS = "mmpt/xs"
BEAT_S = 0.5
"""Heartbeat period of each site's rank 0."""
POLL_S = 0.05


class CrossSiteError(RendezvousError):
    """A cross-site problem with a message naming the address, site or key involved (a RendezvousError:
    the command line reports it as one timestamped line, exit 1, no traceback)."""


def _is_local(host: str, port: int) -> bool:
    """Whether this machine owns `host` (it can bind it): only then may this process serve the store."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        return True
    except OSError:
        return False


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def serve(address: str, timeout_s: float = 600) -> dist.TCPStore:
    """A TCPStore server at `address` (a site's rank 0; `pretrain launch --serve-rendezvous` runs one too)."""
    return serve_store(*parse_address(address), timeout_s)


def open_store(address: str, timeout_s: float, may_host: bool) -> tuple[dist.TCPStore, bool]:
    """(client or server store at `address`, whether this process serves it). Waits up to `timeout_s` for
    something to accept there; then fails naming the address."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    if may_host and not _answers(host, port, 1.0) and _is_local(host, port):
        with contextlib.suppress(RuntimeError, OSError):  # another site bound it first: be its client
            return serve(address, timeout_s), True
    last = wait_for_port(host, port, deadline)
    if last is not None:
        raise CrossSiteError(f"cross-site rendezvous {host}:{port}: nothing accepted a connection within "
                             f"{timeout_s:g} s (cross_site.timeout_s; {last}); is a site's rank 0 or "
                             f"`pretrain launch --serve-rendezvous {address}` running there, and is "
                             "cross_site.rendezvous reachable from this node?")
    try:
        left = max(1.0, deadline - time.monotonic())
        return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=left)), False
    except (RuntimeError, OSError) as e:
        raise CrossSiteError(f"cross-site rendezvous {host}:{port}: could not join the store: {e}") from e


def check_fingerprint(store: dist.TCPStore, site: str, mine: dict[str, Any], address: str) -> None:
    """Refuse to join when this site's fingerprint differs from the one the first site registered."""
    ref = json.loads(store.compare_set(f"{NS}/config", "", json.dumps(mine, sort_keys=True)).decode())
    diff = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
    if diff:
        detail = "; ".join(f"{k}: {mine.get(k)!r} here, {ref.get(k)!r} there" for k in diff)
        raise CrossSiteError(f"site {site} refuses to join the sites at {address}: {', '.join(diff)} "
                             f"differ ({detail}); every site must train the same model with the same "
                             "cross_site.every and layout")


def encode_state(state: dict[str, Any]) -> bytes:
    """An outer state as bytes for the store: tensors as safetensors, everything else as JSON in its
    metadata. No pickle crosses sites (a peer's bytes are never unpickled, not even weights-only)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return save(tensors, metadata={"json": json.dumps(rest)})


def decode_state(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {**load(data), **json.loads(meta.get("json", "{}"))}


class Liveness:
    """Rank 0's view of which sites are alive: a site whose heartbeat has not moved for `stale_s` (as seen
    from here; no clocks are compared) is dead until it moves again."""

    def __init__(self, store: dist.TCPStore, stale_s: float) -> None:
        self.store, self.stale_s = store, stale_s
        self.seen: dict[str, tuple[int, float]] = {}

    def alive(self, site: str) -> bool:
        beat = self.store.add(f"{NS}/beat/{site}", 0)
        now = time.monotonic()
        value, since = self.seen.get(site, (-1, now))
        if beat != value:
            self.seen[site] = (beat, now)
            return beat > 0
        return now - since < self.stale_s


class Heartbeat:
    """Bumps `beat/<site>` every BEAT_S from a daemon thread on its own connection."""

    def __init__(self, address: str, site: str, timeout_s: float) -> None:
        host, port = parse_address(address)
        self.store = dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
        self.key, self._stop = f"{NS}/beat/{site}", threading.Event()
        # a store call in flight ends within the store's timeout; a link cut without a reset could hold it
        # that long, so the end of a run waits at most 10 s for it (then exits as before the join)
        self.join_s = min(timeout_s, 10.0)
        self.store.add(self.key, 1)
        self._thread = threading.Thread(target=self._run, name="mmpt-cross-site-beat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(self.key, 1)
            except Exception:  # the store is gone (its host ended): the round logic reports that
                return

    def stop(self) -> None:
        """Stop beating and wait for the thread. A daemon thread still inside a store call (GIL released)
        when the interpreter exits is unwound through C++ and aborts the process ("terminate called without
        an active exception", SIGABRT after a successful run: seen once in the rejoin e2e test under load)."""
        self._stop.set()
        self._thread.join(timeout=self.join_s)


class Rendezvous:
    """The store protocol of one rank. Methods marked "rank 0" are called by the site's rank 0 only."""

    def __init__(self, store: dist.TCPStore, site: str, rank: int, address: str, timeout_s: float,
                 expected_sites: int) -> None:
        self.store, self.site, self.rank, self.address = store, site, rank, address
        self.timeout_s, self.expected_sites = timeout_s, expected_sites
        self.liveness = Liveness(store, stale_s=min(timeout_s, 15.0))

    # ------------------------------------------------------------------ sites
    def register(self) -> None:
        """rank 0: add this site to the list of sites (once per name)."""
        if self.store.add(f"{NS}/claim/{self.site}", 1) == 1:
            i = self.store.add(f"{NS}/nsites", 1)
            self.store.set(f"{NS}/site/{i}", self.site)
        self.store.delete_key(f"{NS}/done/{self.site}")

    def sites(self) -> list[str]:
        n = self.store.add(f"{NS}/nsites", 0)
        return sorted({self.store.get(f"{NS}/site/{i}").decode() for i in range(1, n + 1)})

    def done(self, site: str) -> bool:
        return self.store.check([f"{NS}/done/{site}"])

    def mark_done(self) -> None:
        self.store.set(f"{NS}/done/{self.site}", "1")

    def group_round(self) -> int:
        return int(self.store.get(f"{NS}/round")) if self.store.check([f"{NS}/round"]) else 0

    # ------------------------------------------------------------------ rounds
    def _key(self, k: int, site: str, rank: int) -> str:
        return f"{NS}/r{k}/d/{site}/{rank}"

    def _deliver(self, key: str, value: bytes) -> None:
        """Set `key` and return only once the store holds it. TCPStore's set is not acknowledged: on a slow
        link the value may still be in flight when this rank tells its site it has posted, and another
        rank's "ready" (its own connection) can overtake it. A check on the same connection is answered
        after the set has been applied."""
        self.store.set(key, value)
        if not self.store.check([key]):
            raise CrossSiteError(f"cross-site: {key} was set but is not in the store at {self.address}")

    def post(self, k: int, payload: bytes) -> None:
        self._deliver(self._key(k, self.site, self.rank), payload)
        if k > 3:  # a late site reads up to three rounds back; older payloads only cost store memory
            self.store.delete_key(self._key(k - 3, self.site, self.rank))

    def fetch(self, k: int, site: str) -> bytes | None:
        key = self._key(k, site, self.rank)
        return self.store.get(key) if self.store.check([key]) else None

    def agree_members(self, k: int, first_round: bool) -> tuple[list[str], list[str]]:
        """rank 0, after every rank of this site posted round k: wait (up to timeout_s) for the other
        live sites, then settle the members of round k (first writer wins). Returns (members, the sites
        this site waited for in vain, each with the reason: heartbeat stopped, or not in time)."""
        self.store.set(f"{NS}/r{k}/ready/{self.site}", "1")
        members_key = f"{NS}/r{k}/members"
        deadline = time.monotonic() + self.timeout_s
        waited: set[str] = set()
        while not self.store.check([members_key]):
            registered = self.sites()
            ready = {s for s in registered if self.store.check([f"{NS}/r{k}/ready/{s}"])}
            pending = {s for s in registered
                       if s not in ready and not self.done(s) and self.liveness.alive(s)}
            waited |= pending
            short = first_round and len(registered) < self.expected_sites
            if not pending and not short:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        proposal = sorted(s for s in self.sites() if self.store.check([f"{NS}/r{k}/ready/{s}"]))
        members = json.loads(self.store.compare_set(members_key, "", json.dumps(proposal)).decode())
        return members, [f"{s} ({self._why_missing(s)})" for s in sorted(waited - set(members))]

    def _why_missing(self, site: str) -> str:
        if not self.liveness.alive(site):
            return f"stopped: no heartbeat for {self.liveness.stale_s:g} s"
        return f"did not deliver within {self.timeout_s:g} s (cross_site.timeout_s)"

    def finish_round(self, k: int) -> None:
        """rank 0: round k is applied here (a joining site may now ask for the state after it)."""
        self.store.set(f"{NS}/round", str(k))

    # ------------------------------------------------------------------ (re)joining
    def pending_join(self) -> int:
        """rank 0: the newest join ticket nobody has served yet (0: none)."""
        joins = self.store.add(f"{NS}/joins", 0)
        served = int(self.store.get(f"{NS}/served")) if self.store.check([f"{NS}/served"]) else 0
        return joins if joins > served else 0

    def publish_state(self, ticket: int, state: dict[str, Any]) -> None:
        self._deliver(f"{NS}/state/{ticket}/{self.rank}", encode_state(state))

    def mark_served(self, ticket: int) -> None:
        self.store.set(f"{NS}/served", str(ticket))

    def ask_state(self) -> int:
        """rank 0: ask the running sites for their outer state; returns the ticket to wait for."""
        return self.store.add(f"{NS}/joins", 1)

    def wait_state(self, ticket: int) -> int:
        """rank 0: wait up to timeout_s for a member to serve `ticket` (or a later one). Returns the ticket
        served (0 when nobody answered)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.store.check([f"{NS}/served"]) and int(self.store.get(f"{NS}/served")) >= ticket:
                return int(self.store.get(f"{NS}/served"))
            time.sleep(POLL_S * 4)
        return 0

    def read_state(self, ticket: int) -> dict[str, Any]:
        return decode_state(self.store.get(f"{NS}/state/{ticket}/{self.rank}"))

    def others_alive(self) -> bool:
        """rank 0: whether another registered site is running (to ask it for the state)."""
        return any(s != self.site and not self.done(s) and self.liveness.alive(s) for s in self.sites())

    def wait_others_done(self) -> None:
        """rank 0 of the serving site, at its end: keep the store up until the other sites are done or
        dead (bounded by timeout_s), so their last round still finds it."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not any(s != self.site and not self.done(s) and self.liveness.alive(s) for s in self.sites()):
                return
            time.sleep(POLL_S * 4)
