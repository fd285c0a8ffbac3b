"""Retention in real training runs (docs/checkpoints.md): with `checkpoint.universal=true` every save also
writes `checkpoints/universal/<tag>` and retention (`keep_last`) applies to both; `--resume
runs/x/checkpoints/universal` takes the newest copy (also when `universal/latest` names a missing one); and a
rollback (`--resume` of an earlier save in the same run) keeps the checkpoint resumed from while the
abandoned branch ages out. Unit-level cases: tests/unit/test_checkpoint_retention.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny import run_pretrain, train_args, write_micro_shards

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.resume import open_universal

pytestmark = pytest.mark.slow
KEEP = ["checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.universal=true"]


def copies(root: Path) -> list[str]:
    return sorted((p.name for p in (root / "universal").iterdir() if p.is_dir()), key=ckpt.step_of)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_micro_shards(tmp_path_factory.mktemp("retention_data"))


@pytest.fixture(scope="module")
def run6(data, tmp_path_factory) -> Path:
    """6 steps, saved every 2 with their universal copies, keep_last=2."""
    run = tmp_path_factory.mktemp("retention") / "run"
    r = run_pretrain(["train", *train_args(data, run, 6, *KEEP)])
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_retention_applies_to_universal_copies(run6):
    root = run6 / "checkpoints"
    assert ckpt.complete_tags(root) == ["global_step4", "global_step6"]
    assert copies(root) == ["global_step4", "global_step6"]
    assert (root / "universal" / "latest").read_text() == "global_step6"


def test_resume_from_the_universal_folder_takes_the_newest_copy(run6, data, tmp_path):
    copies_dir = run6 / "checkpoints" / "universal"
    r = run_pretrain(["train", *train_args(data, tmp_path / "resumed", 7), "--resume", str(copies_dir)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {copies_dir / 'global_step6'} at step 6" in r.stderr
    # `universal/latest` naming a copy that is gone (a save killed mid-way): the newest complete one
    shutil.copytree(run6 / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "universal" / "latest").write_text("global_step8")
    assert open_universal(str(tmp_path / "checkpoints" / "universal")).path.name == "global_step6"


def test_a_rollback_keeps_the_checkpoint_resumed_from(run6, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run6, run)
    root = run / "checkpoints"
    r = run_pretrain(["train", *train_args(data, run, 5, *KEEP), "--resume", str(root / "global_step4")])
    assert r.returncode == 0, r.stderr[-3000:]
    # step 5's save: keep_last=2 keeps it and step 4 (resumed from); the abandoned step 6 is gone
    assert ckpt.complete_tags(root) == ["global_step4", "global_step5"]
    assert copies(root) == ["global_step4", "global_step5"]
    assert (root / "latest").read_text() == (root / "universal" / "latest").read_text() == "global_step5"
    assert "global_step6: those checkpoints belong to an abandoned branch" in r.stderr  # said at the resume
