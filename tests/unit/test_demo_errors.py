"""`pretrain demo` checks the user's overrides at the world size it launches before writing any shard."""

from __future__ import annotations

import pytest

from pretrain import demo
from pretrain.config import ConfigError


def test_overrides_are_checked_at_the_demo_world_size_before_any_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TRAIN_SAMPLES", 500)  # were the check missed, the run would stay short
    monkeypatch.setattr(demo, "VAL_SAMPLES", 500)
    with pytest.raises(ConfigError, match=r"world size 2 is not divisible by parallel.tp \(4\)"):
        demo.run_demo(tmp_path / "demo", procs=2, overrides=["parallel.tp=4"])
    assert not (tmp_path / "demo").exists()
