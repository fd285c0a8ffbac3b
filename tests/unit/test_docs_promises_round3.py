"""docs/checkpoints.md: three kinds of folder are read as checkpoints (DeepSpeed, universal, weights); an HF
or open_clip folder (our `convert --to hf|open_clip` export, or anyone's) is an output, and every command that
takes a checkpoint refuses it naming the import that turns it into a weights folder (`pretrain convert --from
hf|open_clip SRC DST`), not "no DeepSpeed checkpoint"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipelines.synth import write_synthetic_shards
from data_pipelines.tokenizer import TextTokenizer
from pretrain.checkpoint.sources import open_source
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.export.hf import export_hf
from pretrain.export.open_clip import export_open_clip
from pretrain.models import PretrainModel

pytest.importorskip("safetensors")

SMALL = ["model.image_size=16", "model.vision.patch_size=8", "model.vision.width=16", "model.vision.layers=1",
         "model.vision.heads=2", "model.text.width=16", "model.text.layers=1", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=8", "model.decoder.width=8",
         "model.decoder.layers=1", "model.decoder.heads=2"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tok: TextTokenizer) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("exports")
    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    state = PretrainModel.from_config(cfg, tiny_tok).state_dict()
    (d / "hf").mkdir()
    export_hf(state, cfg, tiny_tok.to_json(), d / "hf")
    (d / "oc").mkdir()
    export_open_clip(state, cfg, tiny_tok.to_json(), d / "oc")
    write_synthetic_shards(d / "val", samples=4, samples_per_shard=4, image_size=16, seed=1)
    return {"hf": d / "hf", "open_clip": d / "oc", "data": next((d / "val").glob("*.tar")), "dir": d}


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_open_source_names_the_import_for_an_export(exports, kind: str):
    folder = exports[kind]
    with pytest.raises(FileNotFoundError) as e:
        open_source(folder)
    assert f"pretrain convert --from {kind} {folder} DST" in str(e.value)
    assert "no DeepSpeed checkpoint" not in str(e.value)


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_eval_embed_convert_name_the_import(exports, kind: str, capsys):
    folder, data, d = exports[kind], exports["data"], exports["dir"]
    commands = [["eval", "--checkpoint", str(folder), "--data", str(data)],
                ["embed", "--checkpoint", str(folder), "--data", str(data), "--out", str(d / f"{kind}.npz")],
                ["convert", str(folder), str(d / f"{kind}-w"), "--to", "safetensors"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"pretrain convert --from {kind} {folder} DST" in err, (argv, err)
        assert "Traceback" not in err
    assert not (d / f"{kind}.npz").exists() and not (d / f"{kind}-w").exists()


def test_onnx_folder_is_named_inference_only(tmp_path: Path):
    (tmp_path / "manifest.json").write_text('{"kind": "onnx", "files": {}}')
    with pytest.raises(FileNotFoundError, match="ONNX export.*inference only"):
        open_source(tmp_path)
