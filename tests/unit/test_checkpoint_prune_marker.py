"""Checkpoint folders that are half gone or lost their completion marker:

- retention (`tags.prune`, `tags.prune_universal_copies`) interrupted inside its delete (a kill, an I/O
  error) never leaves a half-deleted folder under its tag name: it is moved into the hidden `.staging/` first
  (or, when that rename fails, loses its marker first), so no listing (`complete_tags`, the `latest`
  fallback, the eval suite's tags) offers it and the next prune removes what is left;
- a tag folder written by mmpt whose `mmpt_complete.json` is missing is refused, naming the folder, by every
  reader (resume, convert, eval via `open_source`), instead of being read unchecked as "plain DeepSpeed";
  folders written by plain DeepSpeed (no marker, no mmpt client state) are still accepted.

Checkpoints are written by the real `save_atomic` through DeepSpeed's own checkpoint engine (helpers of
tests/unit/test_checkpoint_retention.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import tags
from pretrain.checkpoint.resume import resolve_start
from pretrain.checkpoint.sources import open_source
from pretrain.checkpoint.tensor_files import IntegrityError
from pretrain.evaluation.suite import run_tags
from unit.test_checkpoint_retention import CFG, ZERO3, _flip_middle_byte, save

VISIBLE = (ckpt.MARKER, "universal.json", "manifest.json")


class Killed(Exception):
    """The process dies inside rmtree."""


def _killed_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
    """rmtree killed part way: every file but the ones that make a folder look complete is gone."""
    path = Path(path)
    if not path.exists():
        return
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name not in VISIBLE:
            f.unlink()
    raise Killed(str(path))


def _fake_copy(copies: Path, tag: str) -> None:
    (copies / tag).mkdir(parents=True)
    for name in ("universal.json", "manifest.json", "fp32.safetensors"):
        (copies / tag / name).write_text("{}")


def _pruned_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / tags.STAGING).glob(f"*{tags.PRUNED}"))


def test_an_interrupted_prune_leaves_no_half_deleted_checkpoint_in_view(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(root, step, keep_last=0)
    monkeypatch.setattr(shutil, "rmtree", _killed_rmtree)
    with pytest.raises(Killed):
        ckpt.prune(root, keep_last=1, keep_every=0)  # killed while deleting global_step10
    monkeypatch.undo()

    assert not (root / "global_step10").exists()
    assert ckpt.complete_tags(root) == ["global_step20", "global_step30"]
    assert run_tags(root) == (root, ["global_step20", "global_step30"])  # the eval suite's checkpoints
    for tag in ckpt.complete_tags(root):
        ckpt.verify_for_load(root / tag)  # every listed checkpoint loads
    (root / "latest").unlink()  # `latest` lost too: the fallback takes the newest save
    assert ckpt.latest_tag(root) == "global_step30"
    assert ckpt.resolve("latest", root) == (root, "global_step30")
    with pytest.raises(FileNotFoundError):
        ckpt.resolve(str(root / "global_step10"), root)
    assert _pruned_leftovers(root) == ["global_step10.pruned"]

    assert ckpt.prune(root, keep_last=1, keep_every=0) == ["global_step20"]  # the next prune finishes it
    assert _pruned_leftovers(root) == []
    assert ckpt.complete_tags(root) == ["global_step30"]
    assert save(root, 40, keep_last=1) == "global_step40"  # saves go on beside the trash folder
    assert ckpt.complete_tags(root) == ["global_step40"]


def test_an_interrupted_prune_whose_rename_fails_removes_the_marker_first(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        save(root, step, keep_last=0)

    def no_rename(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tags.os, "replace", no_rename)
    monkeypatch.setattr(shutil, "rmtree", _killed_rmtree)
    with pytest.raises(Killed):
        ckpt.prune(root, keep_last=1, keep_every=0)
    monkeypatch.undo()
    assert ckpt.complete_tags(root) == ["global_step20"]
    (root / "latest").unlink()
    assert ckpt.latest_tag(root) == "global_step20"


def test_an_interrupted_prune_of_universal_copies_leaves_no_half_deleted_copy(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 30, keep_last=0)
    copies = root / tags.UNIVERSAL
    for tag in ("global_step10", "global_step20", "global_step30"):
        _fake_copy(copies, tag)
    (copies / "latest").write_text("global_step30")
    monkeypatch.setattr(shutil, "rmtree", _killed_rmtree)
    with pytest.raises(Killed):
        tags.prune_universal_copies(root)  # killed while deleting the copy of global_step10
    monkeypatch.undo()
    visible = sorted(p.name for p in copies.iterdir() if p.is_dir() and tags.is_save_name(p.name))
    assert visible == ["global_step20", "global_step30"]
    assert tags.prune_universal_copies(root) == ["global_step20"]
    assert _pruned_leftovers(root) == []
    assert sorted(p.name for p in copies.iterdir()) == ["global_step30", "latest"]


def test_an_mmpt_checkpoint_without_its_marker_is_refused_by_every_reader(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    tag = root / save(root, 4, keep_last=0)
    (tag / ckpt.MARKER).unlink()
    _flip_middle_byte(tag / ZERO3[1])  # a corrupt optimizer file nothing could catch without the marker
    refused = f"{tag}: an mmpt checkpoint without its completion marker {ckpt.MARKER}"
    with pytest.raises(IntegrityError, match=refused):
        open_source(tag)  # convert, eval, embed, --init-from
    with pytest.raises(IntegrityError, match=refused):
        ckpt.verify_for_load(tag)  # every rank, before DeepSpeed's own load
    with pytest.raises(IntegrityError, match=refused):
        resolve_start(CFG, root, str(tag), None)  # --resume, before the engine is built

    from pretrain.cli import main

    assert main(["convert", str(tag), str(tmp_path / "out"), "--to", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert refused in err and "marker was removed" in err
    assert not (tmp_path / "out").exists()


def test_a_plain_deepspeed_folder_without_a_marker_is_still_accepted(tmp_path):
    tag = tmp_path / "checkpoints" / "global_step4"
    tag.mkdir(parents=True)
    engine = TorchCheckpointEngine()
    engine.save({"module": {"w": torch.ones(10)}, "global_steps": 4}, str(tag / ZERO3[0]))
    engine.save({"optimizer_state_dict": {"zero_stage": 3}}, str(tag / ZERO3[1]))
    assert not ckpt.written_by_mmpt(tag)
    ckpt.verify_marker(tag)
    ckpt.verify_for_load(tag)
    (tag / tags.RESUMED).write_text(json.dumps({"seq": 2}))  # our resume note: written by mmpt after all
    with pytest.raises(IntegrityError, match="without its completion marker"):
        ckpt.verify_marker(tag)


def test_an_mmpt_checkpoint_with_its_marker_still_loads(tmp_path):
    root = tmp_path / "checkpoints"
    tag = root / save(root, 4, keep_last=0)
    assert ckpt.written_by_mmpt(tag)
    ckpt.verify_for_load(tag)
    assert ckpt.read_client_state(root, tag.name)["step"] == 4
    assert os.path.isfile(tag / ckpt.MARKER)
