"""Sites for the cross-site protocol tests: each a real OuterLoop (constructor, join, rounds, finish) with one
rank, on a real TCPStore on loopback; only ZeRO-3's partition is replaced by a plain tensor (`Weights`),
since no DeepSpeed engine runs in these tests. Sites that run at the same time run in threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from parallel.cross_site import OuterLoop
from parallel.settings import CrossSiteConfig

N = 2048


class Weights:
    """Stands in for ZeRO-3's partition of one rank: the flat fp32 weights the outer loop reads and writes."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.clone()

    @property
    def numel(self) -> int:
        return self.w.numel()

    def read(self) -> torch.Tensor:
        return self.w.clone()

    def write(self, flat: torch.Tensor) -> None:
        self.w = flat.clone()


def site(address: str, name: str, w0: torch.Tensor | None = None, timeout_s: float = 3, state=None,
         run_dir: Path | None = None, **cfg) -> OuterLoop:
    """A site's OuterLoop, resumed from `state` (a state_dict) when given; not joined yet."""
    cfg.setdefault("sites", 2)
    c = CrossSiteConfig(site=name, rendezvous=address, timeout_s=timeout_s, **cfg)
    w = torch.zeros(N) if w0 is None else w0
    loop = OuterLoop(c, None, {"model": "test"}, torch.device("cpu"), run_dir=run_dir, partition=Weights(w))
    if state is not None:
        assert loop.load_state_dict(state)
    return loop


def train(loop: OuterLoop, seed: int) -> None:
    """H inner steps: the site's weights move its own way."""
    g = torch.Generator().manual_seed(seed)
    loop.partition.w += 0.01 * torch.randn(loop.partition.numel, generator=g)


def together(*fns):
    """Run the calls at the same time (each site in its own thread); their results, or the first error."""
    out: dict[int, object] = {}

    def run(i, f):
        try:
            out[i] = f()
        except BaseException as e:  # re-raised in the test's thread
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(len(fns)):
        if isinstance(out.get(i), BaseException):
            raise out[i]  # type: ignore[misc]
    return [out[i] for i in range(len(fns))]


def checkpoint(loop: OuterLoop) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in loop.state_dict().items()}


def exchange(a: OuterLoop, b: OuterLoop, rounds: int, keep_b_at: int,
             b_seed: int = 100) -> tuple[dict, torch.Tensor]:
    """Sites a and b train and exchange `rounds` rounds (b on other data: seeds b_seed + k); b's checkpoint
    (outer state and weights) as it was after round `keep_b_at`, for a restart from it."""
    kept: tuple[dict, torch.Tensor] | None = None
    for k in range(1, rounds + 1):
        train(a, k)
        train(b, b_seed + k)
        together(a._round, b._round)
        if k == keep_b_at:
            kept = checkpoint(b), b.partition.read()
    assert kept is not None
    return kept


def asked(member: OuterLoop, timeout_s: float = 20) -> None:
    """Until a joining site has asked the sites (here: `member`'s generation) for their outer state."""
    deadline = time.monotonic() + timeout_s
    while not member.rv.pending_join():
        assert time.monotonic() < deadline, "nobody asked for the outer state"
        time.sleep(0.05)


def join_served_by(joiner: OuterLoop, member: OuterLoop, seed: int, timeout_s: float = 20) -> None:
    """`joiner` joins (in a thread) and asks the sites for their outer state; `member` trains (seed) and runs
    the round whose end serves it."""
    joining = threading.Thread(target=joiner.join, daemon=True)
    joining.start()
    asked(member)
    train(member, seed)
    member._round()
    joining.join(timeout_s)


def stop(*loops: OuterLoop) -> None:
    """The sites' processes end (their heartbeats stop)."""
    for loop in loops:
        if loop.heartbeat is not None:
            loop.heartbeat.stop()
