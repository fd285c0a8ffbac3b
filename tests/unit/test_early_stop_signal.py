"""A stop signal in a training rank's first seconds (launch/signals.py `install_early`): `pretrain train`
records it from the start of its command, before it imports the trainer and DeepSpeed, and `train()` ends
with the requeue status 75 and a log line saying the stop came before training started, with nothing
written. Before, a SIGTERM there killed the rank (status -15, no requeue) and a SIGUSR1, which `pretrain
launch` passes to torchrun's and DeepSpeed's ranks ignored, was lost (training went on to the end).

Real processes: `python -m pretrain.cli train` on a micro model, the signal sent by the process itself
right after the handler is in place (MMPT_FAULT_EARLY_SIGNAL), so the moment is the same on every run."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from tiny import PYTHON, ROOT, train_args, write_micro_shards

from launch.signals import FAULT_EARLY_SIGNAL, REQUEUE_EXIT_CODE, install_early, take_early


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_micro_shards(tmp_path_factory.mktemp("shards"))


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as `pretrain launch` leaves it for torchrun's ranks


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_stop_before_training_exits_75_with_nothing_written(shards, tmp_path, sig):
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "pretrain.cli", "train", "--resume", "latest", *train_args(shards, run, 3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_EARLY_SIGNAL: sig}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                          preexec_fn=_ignore_usr1 if sig == "USR1" else None)
    out = proc.stdout + proc.stderr
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-4000:]
    assert f"stop requested (SIG{sig}) before training started: nothing new to save" in out, out[-4000:]
    assert "exiting 75 (requeue)" in out
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists(), sorted(run.rglob("*"))


def test_install_early_hands_its_request_to_train_once():
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # were it not installed: lost, not fatal to pytest
    stop = install_early()
    try:
        assert install_early() is stop  # idempotent: more than one early caller shares it
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, though inherited as ignored
        taken = take_early()
        assert taken is stop and taken.requested and taken.signal_name == "SIGUSR1"
        assert take_early() is None  # handed over once: a later train() in this process installs its own
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR1, before)


def test_a_train_command_that_fails_before_training_gives_the_handlers_back(tmp_path, capsys):
    """`main` installs the early handler before it builds the parser (torch's import, seconds); a command
    that fails before train() takes it over (here: a config error) must not leave SIGTERM recorded-only in a
    process that carries on, such as this test runner."""
    from pretrain.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "no_such.key=1"]) == 2
    assert "no_such" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    assert take_early() is None
