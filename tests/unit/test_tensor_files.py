"""Streaming safetensors writer, manifests that refuse damaged files by name, and staged outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.tensor_files import (
    MANIFEST,
    IntegrityError,
    SafetensorsWriter,
    save_tensors,
    staged_output,
    verify_manifest,
    write_manifest,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
            "c.ids": torch.arange(11, dtype=torch.int64), "scalar": torch.tensor(2.5)}


def test_streamed_file_reads_back_with_the_reference_reader(tmp_path):
    t = _tensors()
    entry = save_tensors(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert entry["tensors"]["a.weight"]["shape"] == [7, 5] and entry["tensors"]["b"]["dtype"] == "BF16"
    assert entry["bytes"] == (tmp_path / "x.safetensors").stat().st_size


def test_writer_refuses_out_of_order_or_wrong_shape_and_missing_tensors(tmp_path):
    specs = [("p", torch.float32, (2, 2)), ("q", torch.float32, (3,))]
    w = SafetensorsWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(ValueError, match="expected p"):
        w.write("q", torch.zeros(3))
    with pytest.raises(ValueError, match="expected p"):
        w.write("p", torch.zeros(2, 3))
    w.write("p", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def _folder(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    entry = save_tensors(d / "model.safetensors", _tensors())
    (d / "config.json").write_text(json.dumps({"x": 1}))
    write_manifest(d, {"model.safetensors": entry})
    return d


def test_manifest_lists_every_file_and_verifies_clean(tmp_path):
    d = _folder(tmp_path)
    m = verify_manifest(d)
    assert set(m["files"]) == {"model.safetensors", "config.json"}
    assert m["files"]["model.safetensors"]["tensors"]["c.ids"]["dtype"] == "I64"


def test_flipped_byte_is_refused_naming_the_file(tmp_path):
    d = _folder(tmp_path)
    path = d / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside tensor data: same size, different content
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 does not match"):
        verify_manifest(d)


def test_truncated_missing_and_unfinished_are_refused(tmp_path):
    d = _folder(tmp_path)
    (d / "config.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"config\.json: 2 bytes"):
        verify_manifest(d)
    (d / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"config\.json: listed .* but missing"):
        verify_manifest(d)
    (d / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="incomplete"):
        verify_manifest(d)


def test_staged_output_is_all_or_nothing(tmp_path):
    dst = tmp_path / "export"
    with pytest.raises(RuntimeError), staged_output(dst) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-way")
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    with staged_output(dst) as tmp:
        (tmp / "a").write_text("1")
    assert (dst / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="exists"), staged_output(dst):
        pass
    # a failed overwrite keeps the old output
    with pytest.raises(RuntimeError), staged_output(dst, overwrite=True) as tmp:
        raise RuntimeError("disk full")
    assert (dst / "a").read_text() == "1"
    with staged_output(dst, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
