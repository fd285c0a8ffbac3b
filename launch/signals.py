"""Stop requests from the scheduler: SIGUSR1 (Slurm's `--signal=USR1@T` warning before the time limit,
or an explicit `scancel --signal=USR1`) and SIGTERM (preemption, `scancel`, node drain).

The handler only records the request (installed from a rank's first moments: `install_early`); the
training loop polls it at log steps (or every `train.stop_check_every` optimizer steps), all ranks agree
through one tiny collective (`parallel.consensus.any_rank`), save a checkpoint at that step and exit with
REQUEUE_EXIT_CODE (a request seen before training started: at once, nothing to save). Polling every step
would put a collective and a host read into every step. Doing the work in the loop rather than in the
handler keeps every rank at the same step and never interrupts a collective or a checkpoint write halfway.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger("mmpt.launch")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL: "not finished, try again". The sbatch script requeues the job on it; anything else
(0 finished, other codes failed) ends the job."""


class StoppedForRequeue(SystemExit):
    """Raised by the trainer after the checkpoint of `step` is written because a stop was requested.

    A SystemExit so `pretrain train` ends with REQUEUE_EXIT_CODE without any caller having to know;
    code that calls `train()` itself can catch it and read `.step` and `.signal_name`.
    """

    def __init__(self, step: int, signal_name: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step: int | None = step  # None for StoppedBeforeTraining
        self.signal_name = signal_name

    def __str__(self) -> str:
        return (f"stopped at step {self.step} on {self.signal_name}; checkpoint saved, "
                "resume with --resume latest")


class StoppedBeforeTraining(StoppedForRequeue):
    """A stop request that the ranks saw before training started (checked once the process group exists,
    before the checkpoint is even read): nothing new to save, the run stays at its last checkpoint or its
    start, so the ranks exit REQUEUE_EXIT_CODE at once instead of building the model and training up to
    the first stop check under a scheduler's deadline. `.step` is None: no step was reached."""

    def __init__(self, signal_name: str):
        super().__init__(0, signal_name)
        self.step = None

    def __str__(self) -> str:
        return (f"stop requested ({self.signal_name}) before training started: nothing new to save (the run "
                "stays at its last checkpoint, if any); resume with --resume latest")


class StopRequest:
    """Remembers the first stop signal this process received. Install once in the main process before
    forking data workers: they inherit the handler, so a signal sent to the whole process tree (Slurm
    signals every process of a step) does not kill them."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data worker: the main process handles it
            return
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: will checkpoint after the current step (if training has started) and "
                        "exit %d", signal.Signals(signum).name, REQUEUE_EXIT_CODE)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a peer rank's request"

    def ignore_further(self) -> None:
        """From here on the process is exiting for requeue: ignore stop signals at the OS level.

        CPython puts default actions back for Python-level handlers while it finalizes (seconds for a
        torch-sized module graph), and srun --kill-on-bad-exit sends SIGTERM to the other ranks as soon
        as the first one exits 75; without this they would die by that signal instead of exiting 75.
        SIG_IGN survives finalization. `restore()` undoes it for callers that carry on.
        """
        if threading.current_thread() is threading.main_thread():
            for s in self._previous:
                signal.signal(s, signal.SIG_IGN)

    def restore(self) -> None:
        """Put the previous handlers back (tests and programs that call train() several times)."""
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()


_EARLY: dict[str, StopRequest] = {}
FAULT_EARLY_SIGNAL = "MMPT_FAULT_EARLY_SIGNAL"
"""Tests: `USR1` or `TERM` sends that signal to the process right after `install_early` (a stop request in
a rank's first seconds; pretrain/faults.py holds the other fault hooks, but imports torch)."""


def install_early() -> StopRequest:
    """Record stop signals from the first moment of a training rank (`pretrain train` calls it before it
    imports the trainer and DeepSpeed, seconds of every start); `train()` takes the request over
    (`take_early`) and acts on a signal that arrived meanwhile at its first check. Without it such a
    SIGUSR1 was lost (`pretrain launch` passes it to torchrun's and DeepSpeed's ranks ignored) or ended the
    rank, as SIGTERM did, with a status other than 75, so nothing requeued the job. Idempotent."""
    stop = _EARLY.get("stop")
    if stop is None or stop._pid != os.getpid():
        stop = _EARLY["stop"] = StopRequest().install()
    name = os.environ.get(FAULT_EARLY_SIGNAL)
    if name:
        os.kill(os.getpid(), signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"])
    return stop


def take_early() -> StopRequest | None:
    """The request `install_early` set up in this process, handed over once (the caller restores it)."""
    stop = _EARLY.pop("stop", None)
    return stop if stop is not None and stop._pid == os.getpid() else None


def release_early() -> None:
    """Undo an `install_early` that no `train()` took over (the command failed before it: a config error,
    a bad path), so a caller that carries on in-process, such as a test calling `pretrain.cli.main`, gets its
    own signal handlers back."""
    stop = take_early()
    if stop is not None:
        stop.restore()
