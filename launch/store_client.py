"""TCPStore calls that end in time: a bounded client connect and a wrapper whose every operation is bounded.

TCPStore's own `timeout` does not cover a peer that accepted the connection but never answers: another
service listening on the port, or a store host that is frozen (Slurm `scontrol suspend`, a debugger,
SIGSTOP, swap death: the kernel keeps accepting connections for it). Against such a peer the client
constructor and every operation (`add`, `set`, `get`, ...) wait for ever. So each call here runs on a
worker thread (TCPStore releases the GIL) that the caller waits for at most its bound; a store that did
not answer in time is not used again (its thread may be stuck for good).

Used by the job's rendezvous (`launch.rendezvous`) and by the cross-site link (`parallel.cross_site_link`),
which subclass `BoundedStore` for their own messages. Errors are RendezvousErrors: the command line
reports them as one line, no traceback.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from launch.env import RendezvousError

T = TypeVar("T")
CONNECT_GRACE_S = 1.0
"""Extra wait beyond the store's own timeout, so that TCPStore's error (refused, reset) comes first."""


class StoreNoAnswer(RendezvousError):
    """A store call got no answer within its bound: something accepts connections at the address but does
    not answer as a TCP store (another service on the port, or the store's host is frozen)."""


class StoreFailed(RendezvousError):
    """A store call raised (refused, reset, the store's own timeout); `cause` holds that error."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def first_line(error: BaseException) -> str:
    """The first line of an error's text (TCPStore's errors carry a C++ stack after it), else its type."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def boxed(fn: Callable[[], T]) -> tuple[Callable[[], None], dict[str, Any], threading.Event]:
    """`fn` as a job to run on another thread, the box its result or error lands in, and the event set
    when it ends (the caller waits on that with a deadline)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def job() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    return job, box, done


def run_bounded(fn: Callable[[], T], timeout_s: float,
                name: str) -> tuple[bool, T | None, BaseException | None]:
    """(finished, result, error) of `fn` run on a daemon thread named `name`, waited for at most
    `timeout_s` (when not finished the thread is left behind: it may never return)."""
    job, box, done = boxed(fn)
    threading.Thread(target=job, name=name, daemon=True).start()
    finished = done.wait(timeout_s)
    return finished, box.get("result"), box.get("error")


def connect(host: str, port: int, timeout_s: float, world_size: int | None = None,
            name: str = "mmpt-store-connect") -> dist.TCPStore:
    """A TCPStore client of host:port (store timeout `timeout_s`), constructed within about `timeout_s`:
    StoreNoAnswer when the constructor did not return in time, StoreFailed when it raised; both name the
    address, and callers that know more (which rank, which setting) say it in their own message."""
    finished, store, error = run_bounded(
        lambda: dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s)),
        timeout_s + CONNECT_GRACE_S, name)
    if not finished:
        raise StoreNoAnswer(f"{host}:{port}: something accepts connections there but did not answer as a "
                            f"TCP store within {timeout_s:.3g} s")
    if error is not None:
        raise StoreFailed(f"{host}:{port}: could not join the store: {first_line(error)}", error)
    assert store is not None
    return store


class BoundedStore:
    """The store operations of one client, run one at a time on a worker thread, each waited for at most
    `bound_s()` seconds. After one got no answer the store counts as broken: later calls fail at once.

    Subclasses word the errors (`stopped_answering`, `no_answer`, `failed`) and may bound calls by a
    deadline (`bound_s`); errors of a type in `passthrough` are raised unchanged."""

    passthrough: tuple[type[BaseException], ...] = ()

    def __init__(self, store: Any, address: str, timeout_s: float, thread_name: str = "mmpt-store") -> None:
        self.raw, self.address, self.timeout_s = store, address, timeout_s
        self.thread_name = thread_name
        self._broken = ""
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ wording (overridable)
    def bound_s(self) -> float:
        """How long the next call may take."""
        return self.timeout_s

    def stopped_answering(self, what: str, waited_s: float) -> str:
        """The sentence kept (and repeated by later calls) once `what` got no answer."""
        return f"the store stopped answering ({what} got no answer within {waited_s:g} s)"

    def no_answer(self, sentence: str) -> BaseException:
        """The error for a store that stopped answering (`sentence` from `stopped_answering`)."""
        return StoreNoAnswer(f"store {self.address}: {sentence}")

    def failed(self, what: str, error: BaseException) -> BaseException:
        """The error for a call that raised `error`."""
        return StoreFailed(f"store {self.address}: {what} failed ({first_line(error)})", error)

    # ------------------------------------------------------------------ bounded calls
    def _serve_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` (a call on `self.raw`) on the worker thread, bounded by `bound_s()`; `what` names it in
        errors."""
        if self._broken:
            raise self.no_answer(self._broken)
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve_jobs, name=self.thread_name, daemon=True)
            self._worker.start()
        waited = self.bound_s()
        job, box, done = boxed(fn)
        self._jobs.put(job)
        if not done.wait(waited):
            self._broken = self.stopped_answering(what, waited)
            raise self.no_answer(self._broken)
        error = box.get("error")
        if error is not None:
            if isinstance(error, self.passthrough):
                raise error
            raise self.failed(what, error) from None
        return box["result"]

    def close(self) -> None:
        """End the idle worker thread (a call still stuck on a frozen store keeps it; it is a daemon)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker = None

    # ------------------------------------------------------------------ operations
    def set(self, key: str, value: bytes | str) -> None:
        self.call(f"set {key}", lambda: self.raw.set(key, value))

    def get(self, key: str) -> bytes:
        return bytes(self.call(f"get {key}", lambda: self.raw.get(key)))

    def check(self, key: str) -> bool:
        return bool(self.call(f"check {key}", lambda: self.raw.check([key])))

    def add(self, key: str, n: int) -> int:
        return int(self.call(f"add {key}", lambda: self.raw.add(key, n)))

    def delete_key(self, key: str) -> None:
        self.call(f"delete {key}", lambda: self.raw.delete_key(key))
