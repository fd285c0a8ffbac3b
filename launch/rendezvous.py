"""One rendezvous for every launcher: resolve who we are, meet the other ranks, start torch.distributed.

torch's own env:// rendezvous works, but its failures are slow and vague on a cluster: a wrong
MASTER_ADDR retries for up to twice the timeout, a rank started with another WORLD_SIZE waits out
the whole timeout and reports "1/2 clients joined". Here rank 0 opens the TCPStore itself, the other
ranks first wait (up to the timeout) for its port to accept, and every rank checks its world size
against rank 0's before building the process group, so each mistake ends in time with a message
naming the address, the ranks and the variables involved. TCPStore's own timeout does not cover a peer
that accepts connections but never answers (another service on MASTER_PORT, or rank 0's host frozen by
`scontrol suspend`, a debugger, SIGSTOP): the client's connect and every store call of the rendezvous
run bounded by its deadline (`launch.store_client`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from launch import mpi
from launch.env import (
    LaunchEnvError,
    RankInfo,
    RendezvousError,
    export_torch_env,
)
from launch.logs import drop_printed
from launch.ports import free_port, is_tcp_port
from launch.store_client import CONNECT_GRACE_S, BoundedStore, StoreFailed, StoreNoAnswer
from launch.store_client import connect as connect_store

log = logging.getLogger("mmpt.launch")
# torchrun restarts reuse its agent's store: one key space per attempt
_KEY = f"mmpt/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
_PROBE_S = 5.0
"""At most this long for each question to the store when explaining a failed rendezvous."""


def resolve(env: Mapping[str, str] | None = None) -> RankInfo:
    """`discover()` plus what only MPI can tell: ranks under unknown MPI launchers, and rank 0's
    address when an MPI launch did not set MASTER_ADDR/MASTER_PORT. A world of one gets a free port."""
    info = mpi.launch_rank_info(env)
    if info.source in ("openmpi", "pmi", "mpi4py") and not info.master_given:
        shared = mpi.share_master(info)
        if shared is not None:
            info = shared
        elif info.local_world_size != info.world_size and not (os.environ if env is None else env).get(
                "MASTER_ADDR"):
            raise LaunchEnvError(f"{info.world_size} MPI ranks span several nodes but MASTER_ADDR is not set "
                                 "and mpi4py is not installed to share rank 0's address; export MASTER_ADDR "
                                 "(and MASTER_PORT) or `pip install mpi4py`")
    if info.source == "single":
        info = dataclasses.replace(info, master_port=free_port())
    return info


def backend_name() -> str:
    """DeepSpeed's choice for this machine's accelerator (nccl on CUDA, gloo on CPU)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return str(get_accelerator().communication_backend_name())
    except ImportError:
        return "nccl" if torch.cuda.is_available() else "gloo"


def on_cpu() -> bool:
    """Whether DeepSpeed found no accelerator (its CPU accelerator trains instead)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return str(get_accelerator().device_name()) == "cpu"
    except ImportError:
        return not torch.cuda.is_available()


def _where(info: RankInfo) -> str:
    return (f"rank {info.rank} of {info.world_size} (from {info.source} variables), master "
            f"{info.master_addr}:{info.master_port}")


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) -> (host, port); ValueError naming the address otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if not is_tcp_port(port):
        raise ValueError(f"port {port} of {address!r} is not a TCP port (1-65535)")
    return host.strip("[]"), int(port)


def serve_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server at host:port that does not wait for a fixed number of clients."""
    return dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def wait_for_port(host: str, port: int, deadline: float) -> OSError | None:
    """Poll host:port until it accepts a connection; None then, or the last error once `deadline`
    (time.monotonic) has passed. Callers raise with their own message naming the address."""
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return last or OSError("no answer")
        try:
            with socket.create_connection((host, port), timeout=min(left, 2.0)):
                return None
        except OSError as e:  # refused (not up yet), unreachable, name not resolvable: retry until deadline
            last = e
            time.sleep(min(0.25, max(left, 0)))


def wait_for_master(info: RankInfo, deadline: float) -> None:
    """Poll rank 0's port until it accepts a connection; RendezvousError naming it at the deadline."""
    last = wait_for_port(info.master_addr, info.master_port, deadline)
    if last is not None:
        raise RendezvousError(f"{_where(info)}: nothing accepted a connection at "
                              f"{info.master_addr}:{info.master_port} within the timeout "
                              f"({last}); is rank 0 running, and are MASTER_ADDR/"
                              "MASTER_PORT right and reachable from this node?")


def agent_hosts_store() -> bool:
    """torchrun's agent already serves the TCPStore at MASTER_ADDR:MASTER_PORT; every rank is a client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _frozen_hint(info: RankInfo) -> str:
    return (f"another service may be listening on MASTER_PORT {info.master_port}, or rank 0's host is frozen "
            "(Slurm `scontrol suspend`, a debugger, SIGSTOP); check what listens on "
            f"{info.master_addr}:{info.master_port} and that rank 0 is running")


class _RankStore(BoundedStore):
    """One rank's store calls during the rendezvous, each bounded by the rendezvous deadline (at least
    1 s, plus a grace so that TCPStore's own timeout, which init_process_group explains, comes first)."""

    def __init__(self, store: dist.TCPStore, info: RankInfo, deadline: float) -> None:
        super().__init__(store, f"{info.master_addr}:{info.master_port}", 0.0, "mmpt-rendezvous-store")
        self.info, self.deadline = info, deadline

    def bound_s(self) -> float:
        return max(1.0, self.deadline - time.monotonic()) + CONNECT_GRACE_S

    def stopped_answering(self, what: str, waited_s: float) -> str:
        return (f"the store at {self.address} accepted the connection but {what} got no answer within "
                f"{waited_s:.3g} s")

    def no_answer(self, sentence: str) -> BaseException:
        return RendezvousError(f"{_where(self.info)}: {sentence}; {_frozen_hint(self.info)}")

    def failed(self, what: str, error: BaseException) -> BaseException:
        return error  # TCPStore's own error (its timeout, a reset): init_process_group explains it


def _open_store(info: RankInfo, timeout_s: float, deadline: float) -> dist.TCPStore:
    if info.rank == 0 and not agent_hosts_store():
        try:
            return dist.TCPStore(info.master_addr, info.master_port, info.world_size, True,
                                 timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise RendezvousError(f"{_where(info)}: rank 0 could not listen on port {info.master_port} "
                                  f"({e}); is another job or a second rank 0 using it?") from e
    wait_for_master(info, deadline)
    left = max(1.0, deadline - time.monotonic())
    try:
        return connect_store(info.master_addr, info.master_port, left, info.world_size,
                             name="mmpt-rendezvous-connect")
    except StoreNoAnswer:
        raise RendezvousError(f"{_where(info)}: something accepts connections at {info.master_addr}:"
                              f"{info.master_port} but did not answer as rank 0's TCP store within "
                              f"{left:.3g} s; {_frozen_hint(info)}") from None
    except StoreFailed as e:
        raise RendezvousError(f"{_where(info)}: could not join the store at "
                              f"{info.master_addr}:{info.master_port}: {e.cause}") from e.cause


def _check_world(raw: dist.TCPStore, info: RankInfo, deadline: float) -> None:
    """Catch a second process with the same rank and ranks started with different world sizes. Every
    store call ends by the deadline: a RendezvousError naming the address when the store stops answering."""
    store = _RankStore(raw, info, deadline)
    try:
        _compare_world(store, info, deadline)
    finally:
        store.close()


def _compare_world(store: _RankStore, info: RankInfo, deadline: float) -> None:
    if store.add(f"{_KEY}/claim/{info.rank}", 1) > 1:
        store.set(f"{_KEY}/problem", f"two processes were started as rank {info.rank}")
        raise LaunchEnvError(f"{_where(info)}: another process already joined as rank {info.rank}; "
                             "each rank needs its own RANK value")
    store.set(f"{_KEY}/world/{info.rank}", str(info.world_size))
    store.add(f"{_KEY}/joined", 1)
    if info.rank == 0:
        return
    store.raw.set_timeout(datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
    theirs = int(store.get(f"{_KEY}/world/0"))
    if theirs != info.world_size:
        msg = (f"world size mismatch: rank {info.rank} was started with world size {info.world_size} "
               f"({info.source} variables) but rank 0 with {theirs}")
        store.set(f"{_KEY}/problem", msg)
        raise LaunchEnvError(msg + "; start every rank with the same world size")


def _explain_timeout(raw: dist.TCPStore, info: RankInfo, timeout_s: float, err: Exception) -> str:
    store = BoundedStore(raw, f"{info.master_addr}:{info.master_port}", min(timeout_s, _PROBE_S),
                         "mmpt-rendezvous-probe")  # a frozen store must not hold the explanation for ever
    silent = False
    try:
        joined = store.add(f"{_KEY}/joined", 0)
        problem = store.get(f"{_KEY}/problem").decode() if store.check(f"{_KEY}/problem") else ""
    except StoreNoAnswer:
        joined, problem, silent = -1, "", True
    except Exception:  # the store itself may be gone with rank 0; the original error still says why
        joined, problem = -1, ""
    finally:
        store.close()
    seen = "" if joined < 0 else f"{joined} of {info.world_size} ranks joined; "
    if silent:
        seen = f"the store stopped answering: {_frozen_hint(info)}; "
    return (f"{_where(info)}: the process group did not form within {timeout_s:g} s ({seen}"
            f"{problem + '; ' if problem else ''}{type(err).__name__}: {str(err).splitlines()[0]})")


def init_process_group(timeout_s: float, env: Mapping[str, str] | None = None) -> RankInfo:
    """Start torch.distributed (gloo on CPU, nccl on CUDA) for this process, once; return who we are.

    `timeout_s` bounds the rendezvous and every later collective: a rank that dies makes the others
    fail after at most this long instead of hanging. DeepSpeed's communication layer is initialised
    on top of the same group. Also exports RANK/WORLD_SIZE/... for libraries that read them.
    """
    info = resolve(env)
    export_torch_env(info)
    if dist.is_available() and dist.is_initialized():
        return info
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    log.info("%s%s", _where(info), f", SLURM_RESTART_COUNT={restarts}" if restarts is not None else "")
    backend = backend_name()
    if on_cpu():  # in place of DeepSpeed's "Setting accelerator to CPU" warning (launch/logs.py)
        log.info("no GPU: training on CPU")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank % max(1, torch.cuda.device_count()))
    deadline = time.monotonic() + timeout_s
    store = _open_store(info, timeout_s, deadline)
    try:
        _check_world(store, info, deadline)
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except RendezvousError:  # says it all already (a store that stopped answering)
        raise
    except RuntimeError as e:  # DistError and friends; LaunchEnvError (a ValueError) passes unchanged
        raise RendezvousError(_explain_timeout(store, info, timeout_s, e)) from e
    import deepspeed

    if _shm_op_unbuilt():  # instead of minutes of silence
        log.info("compiling DeepSpeed's shared-memory allreduce (first run on this machine: a minute or two)")
    with drop_printed():  # its "DeepSpeed ... built successfully" print, once per rank
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    _unlink_deepspeed_shm(info)
    return info


def _shm_op_unbuilt() -> bool:
    """Whether `deepspeed.init_distributed` is about to compile DeepSpeed's CPU shared-memory allreduce
    (no cached build in torch's extension folder). Best effort: False when anything here is unknown."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # as deepspeed.comm.torch does
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return False
        return not (Path(_get_build_directory(builder.name, False)) / f"{builder.name}.so").exists()
    except Exception:  # a private torch helper, another DeepSpeed: say nothing rather than fail
        return False


def _unlink_deepspeed_shm(info: RankInfo) -> None:
    """Remove the /dev/shm name of this rank's DeepSpeed CPU allreduce segment once every rank mapped it.

    DeepSpeed's shared-memory allreduce (CPU accelerator, ranks on one node) creates one ~69 MB segment
    per rank, named after MASTER_ADDR/PORT, and never unlinks it: a day of test runs left 20 GB in a
    24 GB machine's /dev/shm. The names are only used while the ranks open each other's segments during
    `init_distributed`; after a barrier the mappings are all that matter, so the name can go now and the
    memory is freed when the last process exits -- even after kill -9."""
    if backend_name() != "gloo":
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{info.rank}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()
