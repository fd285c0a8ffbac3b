"""`pretrain launch` as the parent of the deepspeed launcher: stop signals reach the ranks, and the job
ends when they do, with their status.

The deepspeed runner (`deepspeed ...`) has no SIGTERM handler on one node or with `--no_ssh`. Exec'd in
place of `pretrain launch`, it died of a SIGTERM at once: a signal sent only to the job's main process
(Kubernetes, systemd, `kill PID`) left DeepSpeed's per-node launcher and the ranks running without it,
and under Slurm, where that process is the srun task, the step ended and killed the ranks while they
were saving their checkpoint. Here the runner is a child. SIGTERM, SIGINT and SIGUSR1 sent to
`pretrain launch` go to the ranks (the children of each local `deepspeed.launcher.launch`); on
SIGTERM/SIGUSR1 they checkpoint and exit 75 (launch/signals.py), the runner passes that status up and
`pretrain launch` exits with it.

A signal that reaches every process at once (Slurm's scancel or time limit, `kill -- -PGID`, Ctrl-C in a
terminal) can still end the runner first. `pretrain launch` is a child subreaper (Linux), so DeepSpeed's
per-node launcher becomes its child then: it waits for that one, which waits for its ranks, and reports
its status (DeepSpeed's per-node launcher reports 1 after a SIGTERM of its own, as torchrun does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil  # a dependency of deepspeed, whose launcher this runs

FORWARDED: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LOCAL_AGENT = "deepspeed.launcher.launch"
"""The module DeepSpeed runs once per node; its children are the ranks."""
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.2


def become_subreaper() -> bool:
    """Make orphaned descendants children of this process (Linux), so it can wait for them; False where
    the kernel does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _is_agent(proc: psutil.Process) -> bool:
    try:
        return LOCAL_AGENT in proc.cmdline()
    except psutil.Error:
        return False


def rank_processes(root: int) -> list[psutil.Process]:
    """The ranks below process `root`: the children of every local deepspeed.launcher.launch among its
    descendants ([] before they have started, and for ranks on other hosts)."""
    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    ranks: list[psutil.Process] = []
    for proc in below:
        if _is_agent(proc):
            with contextlib.suppress(psutil.Error):
                ranks += proc.children()
    return ranks


def _say(message: str) -> None:
    print(f"pretrain launch: {message}", file=sys.stderr, flush=True)


def forward(pending: list[int], root: int, to_launcher: bool) -> None:
    """Send each pending signal to the ranks below `root` (or to `root` itself when `to_launcher`), in
    order; one that arrives before any rank has started stays pending until one has."""
    while pending:
        sig = signal.Signals(pending[0])
        if to_launcher and sig == signal.SIGUSR1:
            # the runner inherits SIGUSR1 ignored (run_supervised) and has no way to pass it over ssh: say so
            # rather than promise a checkpoint that will not come
            pending.pop(0)
            _say("got SIGUSR1, which the deepspeed launcher cannot pass to ranks it started over ssh/pdsh: "
                 "no checkpoint is taken and training goes on (to checkpoint on SIGUSR1, start one "
                 "`pretrain launch --no-ssh` per node under srun, as slurm/pretrain.sbatch does)")
            continue
        targets = [root] if to_launcher else [p.pid for p in rank_processes(root)]
        if not targets:
            return
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        pending.pop(0)
        what = "the deepspeed launcher" if to_launcher else f"{len(targets)} rank(s)"
        if to_launcher:  # DeepSpeed's runner answers it by stopping the remote ranks over ssh (pdsh kill)
            after = " (over ssh it stops the ranks without a checkpoint)"
        else:
            after = " (they checkpoint at their next stop check and exit 75)" if sig != signal.SIGINT else ""
        _say(f"got {sig.name}; passed it to {what}{after}")


def _wait_adopted(status: int, pending: list[int]) -> int:
    """The runner died of a signal, which reached its per-node launcher too: wait for that launcher (now
    our child), which waits for its ranks, passing on any further signal; its status, else `status`."""
    me = os.getpid()
    try:
        agents = {p.pid for p in psutil.Process(me).children() if _is_agent(p)}
    except psutil.Error:
        agents = set()
    if not agents:
        return status
    _say(f"the deepspeed launcher ended by {signal.Signals(-status).name}; waiting for its ranks to finish")
    result: int | None = None
    while agents:
        forward(pending, me, to_launcher=False)
        for pid in list(agents):
            try:
                done, raw = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                agents.discard(pid)
                continue
            if done:
                agents.discard(pid)
                result = os.waitstatus_to_exitcode(raw)
        time.sleep(POLL_S)
    return status if result is None else result


def run_supervised(cmd: list[str], to_launcher: bool = False) -> int:
    """Run the deepspeed launcher `cmd` as a child, pass SIGTERM/SIGINT/SIGUSR1 on (to the local ranks;
    with `to_launcher`, e.g. ranks started over ssh, to the launcher, whose own handler stops them), and
    return its exit status (128 + N for death by signal N, as a shell reports it)."""
    subreaper = become_subreaper()
    pending: list[int] = []
    saved: dict[int, Callable[..., object] | int | None] = {s: signal.getsignal(s) for s in FORWARDED}
    # Slurm signals every process of a step, and SIGUSR1's default action would end the launcher's own
    # processes before the ranks checkpoint: ignored here, inherited across exec by the runner and the
    # per-node launcher; the ranks install their own handler (launch/signals.py).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        child = subprocess.Popen(cmd)
        for s in FORWARDED:
            signal.signal(s, lambda signum, _frame: pending.append(signum))
        while child.poll() is None:
            forward(pending, child.pid, to_launcher)
            time.sleep(POLL_S)
        status = child.returncode
        if status < 0 and subreaper:
            status = _wait_adopted(status, pending)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
    return 128 - status if status < 0 else status
