"""`convert --from hf|open_clip` of our own export checks the manifest.json it carries: a flipped byte is
refused naming the file, not imported and re-certified by the new folder's manifest. A folder without our
manifest (anyone else's export) is read as before (review round 4, finding 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_tiny_weights

from data_pipelines.tokenizer import TextTokenizer
from pretrain.checkpoint.convert import convert, import_checkpoint
from pretrain.checkpoint.tensor_files import MANIFEST, IntegrityError
from pretrain.cli import main

pytest.importorskip("safetensors")

WEIGHTS = {"hf": "model.safetensors", "open_clip": "open_clip_model.safetensors"}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 97] ^= 0x40  # inside the last tensor's values: the file still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_corrupt_own_export_is_refused_naming_the_file(tmp_path: Path, tiny_tok: TextTokenizer, kind: str,
                                                       capsys):
    export = tmp_path / "export"
    convert(write_tiny_weights(tmp_path / "weights", tiny_tok), export, kind)
    assert (export / MANIFEST).is_file()
    import_checkpoint(kind, export, tmp_path / "intact")  # the intact export imports
    _flip(export / WEIGHTS[kind])
    with pytest.raises(IntegrityError, match=rf"export/{WEIGHTS[kind]}: sha256 does not match"):
        import_checkpoint(kind, export, tmp_path / "a")
    assert main(["convert", "--from", kind, str(export), str(tmp_path / "b")]) == 2
    assert WEIGHTS[kind] in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_folder_without_our_manifest_is_read_as_before(tmp_path: Path, tiny_tok: TextTokenizer, kind: str):
    export = tmp_path / "export"
    convert(write_tiny_weights(tmp_path / "weights", tiny_tok), export, kind)
    (export / MANIFEST).unlink()  # as anyone else's folder: no manifest to hold it to
    _flip(export / WEIGHTS[kind])
    import_checkpoint(kind, export, tmp_path / "imported")
    assert (tmp_path / "imported" / "model.safetensors").is_file()
