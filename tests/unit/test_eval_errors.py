"""`pretrain eval` bad input: a clear message naming the problem and no output, before or instead of a
result: missing classnames, shards without labels, a checkpoint of another model config, probe shards
without `.cls`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datautil import good_members, write_tar

from data_pipelines.synth import write_synthetic_shards
from pretrain.checkpoint.sources import DictSource
from pretrain.checkpoint.universal import write_weights
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config, to_dict
from pretrain.models.pretrain_model import PretrainModel

SMALL = ["model.image_size=16", "model.vision.patch_size=8", "model.vision.width=16", "model.vision.layers=1",
         "model.vision.heads=2", "model.text.width=16", "model.text.layers=1", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=8", "model.decoder.width=8",
         "model.decoder.layers=1", "model.decoder.heads=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tok) -> dict:
    d = tmp_path_factory.mktemp("evalerr")
    val = write_synthetic_shards(d / "val", samples=6, samples_per_shard=6, image_size=16, seed=1)
    (d / "nolabel").mkdir()
    write_tar(d / "nolabel" / "shard-000000.tar", good_members("u", 4))  # images and captions, no .cls
    cfg = load_config(embedded_config_path(), SMALL)
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tiny_tok)
    meta = {"config": to_dict(cfg), "tokenizer": tiny_tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random"), d / "weights")
    return {"d": d, "weights": str(d / "weights"), "val": val["urls"],
            "classnames": str(d / "val" / "classnames.txt"),
            "nolabel": str(d / "nolabel" / "shard-000000.tar")}


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args, "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_good_input_gives_a_result(setup, capsys):
    code, out, _ = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["val"],
                         "--classnames", setup["classnames"])
    assert code == 0 and json.loads(out)["samples"] == 6


def test_missing_classnames(setup, capsys):
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["val"],
                           "--classnames", str(setup["d"] / "nope.txt"))
    assert code == 2 and out == "" and "not found" in err and "nope.txt" in err


def test_shards_without_labels(setup, capsys):
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["nolabel"],
                           "--classnames", setup["classnames"])
    assert code == 2 and out == "" and "has a .cls label" in err


def test_probe_shards_without_labels(setup, capsys):
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["val"],
                           "--classnames", setup["classnames"], "--linear-probe", setup["nolabel"])
    assert code == 2 and out == "" and "no labelled (.cls) samples" in err and "nolabel" in err


def test_checkpoint_whose_config_was_swapped(setup, capsys, tmp_path):
    """A config that does not describe the tensors beside it: refused by the export's manifest, by name."""
    other = tmp_path / "other"
    shutil.copytree(setup["weights"], other)
    cfg_file = other / "config.json"
    meta = json.loads(cfg_file.read_text())
    assert meta["format"] == "mmpt-weights"
    meta["config"]["model"]["embed_dim"] = 12  # the tensors say 8
    cfg_file.write_text(json.dumps(meta))
    code, out, err = _eval(capsys, "--checkpoint", str(other), "--data", setup["val"],
                           "--classnames", setup["classnames"])
    assert code == 2 and out == ""
    assert "config.json" in err and "manifest.json says" in err, err
