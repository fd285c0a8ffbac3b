"""One rank's connection to the sites' TCP store: every operation bounded in time, every failure a
CrossSiteError naming the rendezvous, and, with `cross_site.secret_file`, every value signed.

TCPStore alone gives none of that. Its client constructor and its operations wait without limit for a
peer that accepted the connection but never answers: another service on that port, or a store host that
is frozen (Slurm `scontrol suspend`, a debugger, swap death: the kernel keeps accepting). Its errors are
raw `DistNetworkError: Broken pipe` with a C++ stack. And anyone who reaches the port can read and write
any key. So each operation here runs on a worker thread (TCPStore releases the GIL) that the caller waits
for at most `timeout_s` (`launch.store_client`, shared with the job's own rendezvous); a store that did not
answer in time is not used again (its thread may be stuck for good), and every error says which rendezvous
and which operation.

Values written with `set`/`compare_set` carry an HMAC-SHA256 tag over (key, value) when a shared secret
is configured, checked by `get`/`compare_set` before the value is used: a forged value, or one copied to
another key (a payload moved to another round, site or rank: the key is signed too), is refused naming the
key. An older signed value written back under its own key is not (no freshness: docs/cross_site.md says what
that allows and why the port must stay private). Counters (`add`) are not signed: they only pace the
protocol (heartbeats, tickets), never carry weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from launch import store_client
from launch.env import RendezvousError
from launch.rendezvous import parse_address, serve_store, wait_for_port
from launch.store_client import BoundedStore, first_line, run_bounded

log = logging.getLogger("mmpt.cross_site")
T = TypeVar("T")
NS = "mmpt/xs"
BEAT_S = 0.5
"""Heartbeat period of each site's rank 0."""
TAG_BYTES = 32
SECRET_MIN_BYTES = 16


class CrossSiteError(RendezvousError):
    """A cross-site problem with a message naming the address, site or key involved (a RendezvousError:
    the command line reports it as one timestamped line, exit 1, no traceback)."""


class StoreGone(CrossSiteError):
    """The store did not answer or the connection broke (not a protocol problem): a site whose partners
    are all done may go on alone after this."""


def read_secret(path: str) -> bytes | None:
    """The shared secret of `cross_site.secret_file` (None when unset), or a CrossSiteError naming the key."""
    if not path:
        return None
    try:
        data = Path(path).expanduser().read_bytes().strip()
    except OSError as e:
        raise CrossSiteError(f"cross_site.secret_file {path}: cannot read it ({e.strerror or e})") from None
    if len(data) < SECRET_MIN_BYTES:
        raise CrossSiteError(f"cross_site.secret_file {path}: holds {len(data)} bytes; the shared secret "
                             f"needs at least {SECRET_MIN_BYTES} (e.g. `openssl rand -hex 32 > {path}`, the "
                             "same file at every site)")
    return data


def connect(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore client, or a CrossSiteError within `timeout_s` naming the address (a listener that
    accepts but never answers would otherwise hold the constructor for ever: `launch.store_client`)."""
    try:
        return store_client.connect(host, port, timeout_s, name="mmpt-cross-site-connect")
    except store_client.StoreNoAnswer:
        raise StoreGone(f"cross-site rendezvous {host}:{port}: something accepts connections there but "
                        f"did not answer as a TCP store within {timeout_s:.3g} s (cross_site.timeout_s): the "
                        "store's host is frozen (suspended, stopped in a debugger, swapping) or another "
                        "service uses that port") from None
    except store_client.StoreFailed as e:
        raise StoreGone(f"cross-site rendezvous {host}:{port}: could not join the store: "
                        f"{first_line(e.cause) if e.cause is not None else e}") from None


class Link(BoundedStore):
    """The store operations one rank uses, each bounded by `timeout_s` (`launch.store_client.BoundedStore`)
    and reported as a CrossSiteError naming `address`; values signed with `secret` when there is one."""

    passthrough = (CrossSiteError,)

    def __init__(self, store: Any, address: str, timeout_s: float, secret: bytes | None = None) -> None:
        super().__init__(store, address, timeout_s, thread_name="mmpt-cross-site-store")
        self.secret = secret

    # ------------------------------------------------------------------ bounded calls: the wording
    def stopped_answering(self, what: str, waited_s: float) -> str:
        return (f"the store stopped answering ({what} got no answer within {waited_s:g} s, "
                "cross_site.timeout_s): its host is frozen or the link is down")

    def no_answer(self, sentence: str) -> BaseException:
        return StoreGone(f"cross-site rendezvous {self.address}: {sentence}")

    def failed(self, what: str, error: BaseException) -> BaseException:
        return StoreGone(f"cross-site rendezvous {self.address}: {what} failed ({first_line(error)}): the "
                         "store is gone (the site serving it ended, or its host is unreachable)")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.call(what, fn)

    # ------------------------------------------------------------------ signatures
    def _tag(self, key: str, value: bytes) -> bytes:
        assert self.secret is not None
        return hmac.new(self.secret, key.encode() + b"\0" + value, hashlib.sha256).digest()

    def seal(self, key: str, value: bytes | str) -> bytes:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return data + self._tag(key, data) if self.secret else data

    def unseal(self, key: str, data: bytes) -> bytes:
        if not self.secret:
            return data
        value, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if len(data) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(key, value)):
            raise CrossSiteError(f"cross-site rendezvous {self.address}: {key} fails its signature check: it "
                                 "was not written by a site holding the same cross_site.secret_file (another "
                                 "secret, or someone else who reaches the store); it is not used")
        return value

    # ------------------------------------------------------------------ operations
    def set(self, key: str, value: bytes | str) -> None:
        sealed = self.seal(key, value)
        self._call(f"set {key}", lambda: self.raw.set(key, sealed))

    def get(self, key: str) -> bytes:
        return self.unseal(key, self._call(f"get {key}", lambda: self.raw.get(key)))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """The value now at `key` (unsealed): `desired` when `expected` matched ("" = absent)."""
        old = self.seal(key, expected) if expected else b""
        new = self.seal(key, desired)
        return self.unseal(key, self._call(f"compare_set {key}", lambda: self.raw.compare_set(key, old, new)))


def as_link(store: Any, address: str, timeout_s: float) -> Link:
    """`store` if it is a Link already, else a raw TCPStore wrapped in one (no secret)."""
    return store if isinstance(store, Link) else Link(store, address, timeout_s)


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


def open_store(address: str, timeout_s: float, may_host: bool,
               secret: bytes | None = None) -> tuple[Link, bool]:
    """(this rank's Link to the store at `address`, whether this process serves it). Waits up to `timeout_s`
    for something to accept there and answer as a store; then fails naming the address."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    if may_host and not _answers(host, port, 1.0) and _is_local(host, port):
        with contextlib.suppress(RuntimeError, OSError):  # another site bound it first: be its client
            return Link(serve(address, timeout_s), address, timeout_s, secret), True
    last = wait_for_port(host, port, deadline)
    if last is not None:
        raise CrossSiteError(f"cross-site rendezvous {host}:{port}: nothing accepted a connection within "
                             f"{timeout_s:g} s (cross_site.timeout_s; {last}); is a site's rank 0 or "
                             f"`pretrain launch --serve-rendezvous {address}` running there, and is "
                             "cross_site.rendezvous reachable from this node?")
    store = connect(host, port, max(1.0, deadline - time.monotonic()))
    return Link(store, address, timeout_s, secret), False


class Heartbeat:
    """Bumps `beat/<site>` every BEAT_S from a daemon thread on its own connection. A failed beat (a reset
    connection, the store's host restarting) is retried with backoff, on a new connection, until stop():
    one blip must not make the other sites take this one for dead for the rest of the run."""

    MAX_BACKOFF_S = 10.0

    def __init__(self, address: str, site: str, timeout_s: float) -> None:
        self.host, self.port = parse_address(address)
        self.address, self.timeout_s = address, timeout_s
        self.store: Any = connect(self.host, self.port, timeout_s)
        self.key, self._stop = f"{NS}/beat/{site}", threading.Event()
        # a store call in flight ends within the store's timeout; a link cut without a reset could hold it
        # that long, so the end of a run waits at most 10 s for it (then exits as before the join)
        self.join_s = min(timeout_s, 10.0)
        self.failures = 0
        finished, _, error = run_bounded(lambda: self.store.add(self.key, 1), timeout_s, "mmpt-xs-beat0")
        if not finished or error is not None:
            raise StoreGone(f"cross-site rendezvous {address}: the first heartbeat got no answer within "
                            f"{timeout_s:g} s (cross_site.timeout_s)" if not finished else
                            f"cross-site rendezvous {address}: the first heartbeat failed ({error})")
        self._thread = threading.Thread(target=self._run, name="mmpt-cross-site-beat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        if self.store is None:
            self.store = connect(self.host, self.port, self.timeout_s)
        self.store.add(self.key, 1)

    def _run(self) -> None:
        wait = BEAT_S
        while not self._stop.wait(wait):
            try:
                self._beat()
            except Exception as e:  # retried: the round logic reports a store that stays gone
                self.failures += 1
                if self.failures == 1:
                    log.warning("cross-site: heartbeat to %s failed (%s); retrying with backoff",
                                self.address, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.store = None  # reconnect on the next try
                wait = min(max(wait, BEAT_S) * 2, self.MAX_BACKOFF_S)
                continue
            if self.failures:
                log.info("cross-site: heartbeat to %s works again after %d failed tries", self.address,
                         self.failures)
                self.failures = 0
            wait = BEAT_S

    def stop(self) -> None:
        """Stop beating and wait for the thread. A daemon thread still inside a store call (GIL released)
        when the interpreter exits is unwound through C++ and aborts the process ("terminate called without
        an active exception", SIGABRT after a successful run: seen once in the rejoin e2e test under load)."""
        self._stop.set()
        self._thread.join(timeout=self.join_s)
