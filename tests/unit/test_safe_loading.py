"""Weights-only loading everywhere: DeepSpeed's own readers forced safe, files refused by name before
DeepSpeed reads them, and the DeepSpeed records real checkpoints need still allowed (one process; the
multi-rank and CLI paths are in tests/e2e/test_no_unpickling.py)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import weights_only

REFUSED = "refused: contains code or objects that are not tensors (unsupported global posix.system)"


class Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def _planted(path: Path, marker: Path) -> Path:
    torch.save({"optimizer_state_dict": {}, "payload": Payload(marker)}, path)
    return path


def test_deepspeeds_checkpoint_engine_is_forced_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    bad = _planted(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    original = torch.load
    with weights_only.weights_only_loads(), pytest.raises(weights_only.UnsafeCheckpointError) as err:
        TorchCheckpointEngine().load(str(bad), map_location="cpu")  # DeepSpeed passes weights_only=False
    assert str(err.value).startswith(f"{bad}: {REFUSED}")
    assert torch.load is original
    assert not marker.exists()


class StubEngine:
    """A DeepSpeed engine stand-in: its load reads `reads` as DeepSpeed does (weights_only=False)."""

    def __init__(self, reads: list[Path]) -> None:
        self.reads, self.calls = reads, 0

    def load_checkpoint(self, root: str, tag: str):
        self.calls += 1
        for f in self.reads:
            torch.load(f, map_location="cpu", weights_only=False)
        return f"{root}/{tag}", {}


def _tag(tmp_path: Path) -> Path:
    tag = tmp_path / "global_step1"
    tag.mkdir()
    torch.save({"module": {"w": torch.zeros(3)}}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return tag


def test_load_deepspeed_refuses_a_file_before_deepspeed_reads_anything(tmp_path):
    tag, marker = _tag(tmp_path), tmp_path / "pwned"
    bad = _planted(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    engine = StubEngine([bad])
    with pytest.raises(weights_only.UnsafeCheckpointError, match="unsupported global posix.system") as err:
        ckpt.load_deepspeed(engine, tmp_path, tag.name)
    assert str(err.value).startswith(f"{bad}: refused")
    assert engine.calls == 0 and not marker.exists()


def test_load_deepspeed_keeps_every_torch_load_inside_deepspeed_weights_only(tmp_path):
    tag, marker = _tag(tmp_path), tmp_path / "pwned"
    clean = sorted(tag.glob("*.pt"))
    outside = _planted(tmp_path / "elsewhere.pt", marker)  # not among the files the pre-check reads
    ckpt.load_deepspeed(StubEngine(clean), tmp_path, tag.name)  # real files still load
    refused = REFUSED.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(weights_only.UnsafeCheckpointError, match=refused):
        ckpt.load_deepspeed(StubEngine([*clean, outside]), tmp_path, tag.name)
    assert not marker.exists()


def test_files_each_rank_checks_are_those_deepspeed_reads(tmp_path):
    names = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    got = [p.name for p in ckpt.deepspeed_reads(tmp_path)]  # rank 0 of 1 (no process group)
    assert got == sorted(["zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt",
                          "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    elastic = [p.name for p in ckpt.deepspeed_reads(tmp_path, elastic=True)]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in elastic
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" not in elastic


def test_damaged_and_refused_files_are_told_apart_and_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{cut}: cannot be read as a checkpoint file") as err:
        weights_only.mmap_load(cut)
    assert not isinstance(err.value, weights_only.UnsafeCheckpointError)
    module = tmp_path / "module.pt"
    torch.save({"m": torch.nn.Linear(2, 2)}, module)  # a pickled module: code, not tensors
    with pytest.raises(weights_only.UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        weights_only.check_loadable([good, module])
    assert torch.equal(weights_only.safe_load(good)["w"], torch.ones(4))


def test_deepspeed_records_of_real_checkpoints_are_allowed(tmp_path):
    """ZeRO 1-2 optimizer states pickle `fragment_address` records (and stage enums); without them on
    the allow-list eval and resume of ZeRO 1-2 checkpoints failed."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=3, start=5)}]}, f)
    weights_only.check_loadable([f])
    state = weights_only.safe_load(f)
    assert state["param_slice_mappings"][0]["w"] == fragment_address(numel=3, start=5)
    assert state["zero_stage"] == ZeroStageEnum.gradients
