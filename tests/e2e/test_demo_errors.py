"""`pretrain demo` whose training ranks fail: one line naming the ranks' exit status, which the command
exits with, instead of a CalledProcessError traceback."""

from __future__ import annotations

import pytest

from pretrain import demo
from pretrain.cli import main

pytestmark = pytest.mark.slow


def test_failed_demo_training_is_one_line_with_the_ranks_status(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(demo, "TRAIN_SAMPLES", 500)  # one shard each: the launch is what is tested
    monkeypatch.setattr(demo, "VAL_SAMPLES", 500)
    missing = tmp_path / "no-such-tokenizer.json"  # valid config; each rank fails when it reads it
    status = main(["demo", "--out", str(tmp_path / "demo"), "--procs", "1", f"data.tokenizer={missing}"])
    err = capfd.readouterr().err
    assert status == 2, err[-3000:]
    assert "pretrain: error: demo training failed with exit status 2 (the ranks' errors are above)" in err
    assert "CalledProcessError" not in err
