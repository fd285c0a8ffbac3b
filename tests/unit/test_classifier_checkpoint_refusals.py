"""A fine-tuned classifier's checkpoint (`train.task=classify`: image tower + class head, no text tower) given
to the commands that build a CLIP model (embed, convert --to hf|open_clip) is named as such, with what
reads it; they said "does not match the model: missing ['logit_scale', ...]" or "not a PretrainModel state
dict". `--to safetensors` still exports it; `pretrain eval` scores it (tests/unit/test_classifier_eval.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TINY_INFER

from pretrain.checkpoint.convert import convert
from pretrain.checkpoint.sources import DictSource
from pretrain.checkpoint.universal import write_weights
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config, to_dict
from pretrain.models.classifier import ClassifierModel


@pytest.fixture(scope="module")
def classifier(tiny_tok, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("classifier")
    names = ["cat", "dog", "bird"]
    (d / "cn.txt").write_text("\n".join(names) + "\n")
    cfg = load_config(embedded_config_path(), [*TINY_INFER, "train.task=classify",
                                               f"finetune.classnames={d / 'cn.txt'}"])
    torch.manual_seed(0)
    model = ClassifierModel.from_config(cfg, len(names))
    meta = {"config": to_dict(cfg), "tokenizer": tiny_tok.to_json(), "step": 3, "classnames": names}
    write_weights(DictSource(model.state_dict(), meta, "fine-tune"), d / "weights", overwrite=True)
    return d / "weights"


@pytest.mark.parametrize("args", [["embed", "--checkpoint", "{w}", "--out", "{o}/e.npz", "--texts",
                                   "{o}/t.txt"],
                                  ["convert", "{w}", "{o}/hf", "--to", "hf"],
                                  ["convert", "{w}", "{o}/oc", "--to", "open_clip"]])
def test_clip_commands_name_a_classifier(classifier, tmp_path, capsys, args):
    (tmp_path / "t.txt").write_text("a caption\n")
    argv = [a.format(w=classifier, o=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a fine-tuned classifier (train.task=classify" in err and "--to safetensors|universal" in err, err
    assert "missing" not in err and "Traceback" not in err, err


def test_a_classifier_still_exports_as_safetensors(classifier, tmp_path):
    out = convert(classifier, tmp_path / "st", "safetensors")
    assert (Path(out["out"]) / "model.safetensors").is_file()
