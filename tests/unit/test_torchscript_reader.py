"""`pretrain convert --from openai` reads TorchScript archives (OpenAI's released CLIP files) as data:
nothing in the file runs. A scripted `__setstate__` (which `torch.jit.load` runs while loading) is never
run and the archive is refused naming the class; a pickle naming any other global is refused without
calling it; the tensors read are exactly `torch.jit.load(...).state_dict()` (used here only as the oracle,
on files these tests write themselves), whatever the attribute types around them."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional

import pytest
import torch

from pretrain.checkpoint.convert import import_checkpoint
from pretrain.checkpoint.weights_only import UnsafeCheckpointError
from pretrain.cli import main
from pretrain.export.torchscript import read_torchscript_state

MARKER = "PAYLOAD: code from the checkpoint file ran"


class _Payload(torch.nn.Module):
    """A scripted module whose `__setstate__` has a side effect (TorchScript code can print, not write)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("PAYLOAD: code from the checkpoint file ran")
        self.w = state[0]
        self.training = state[1]


class _Block(torch.nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.attn_mask = mask  # a plain tensor attribute: not in state_dict()
        self.register_buffer("buf", torch.arange(3))
        self.ints: list[int] = [1, 2]
        self.names: dict[str, int] = {"a": 1}
        self.maybe: Optional[float] = None  # noqa: UP045 -- TorchScript's annotation syntax
        self.pair: tuple[int, str] = (1, "x")
        self.dev = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.attn_mask[0, 0]


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        mask = torch.ones(4, 4)
        self.blocks = torch.nn.ModuleList([_Block(mask), _Block(mask)])
        self.view = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])  # a strided view of a larger storage
        self.fp16 = torch.nn.Parameter(torch.randn(3).half())
        self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.seq(x) @ self.view[:, :2].T[:2] + self.fp16[0]


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.load's deprecation notice
        return torch.jit.load(str(path)).state_dict()


def test_scripted_setstate_never_runs_and_is_refused(tmp_path: Path, capfd):
    path = tmp_path / "evil_openai.pt"
    torch.jit.save(torch.jit.script(_Payload()), str(path))
    _jit_state(path)
    assert MARKER in capfd.readouterr().out  # the hazard: torch.jit.load runs the file's code
    with pytest.raises(ValueError, match=r"evil_openai\.pt: refused: TorchScript class __torch__\..*_Payload "
                                         r"\(the root module\) restores its state with its own __setstate__"):
        import_checkpoint("openai", path, tmp_path / "init")
    assert main(["convert", "--from", "openai", str(path), str(tmp_path / "init")]) == 2
    captured = capfd.readouterr()
    assert MARKER not in captured.out + captured.err and "is never run" in captured.err
    assert not (tmp_path / "init").exists()


def test_tensors_equal_jit_state_dict(tmp_path: Path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Model()), str(path))
    ours, ref = read_torchscript_state(path), _jit_state(path)
    assert set(ours) == set(ref) and "blocks.0.attn_mask" not in ours  # parameters and buffers only
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def _archive(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", data_pkl)
        zf.writestr("x/code/__torch__/m.py", "class M(Module):\n  __parameters__ = [\"w\", ]\n")
        for name, raw in (records or {}).items():
            zf.writestr(f"x/{name}", raw)


class _System:
    """Pickles as a call of os.system (what a hostile data.pkl would hold)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def test_other_globals_are_refused_without_being_called(tmp_path: Path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pt"
    _archive(path, pickle.dumps(_System(f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"hostile\.pt: refused: .* names (posix|os)\.system"):
        read_torchscript_state(path)
    assert not marker.exists()


def test_truncated_storage_is_named(tmp_path: Path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(8, 8)), str(path))
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(cut, "w") as zf:
        for name, raw in files.items():
            zf.writestr(name, raw[:10] if name.endswith("/data/0") else raw)
    with pytest.raises(ValueError, match=r"cut\.pt: .*/data/0 holds 10 bytes, fewer than its 64 x 4-byte"):
        read_torchscript_state(cut)
