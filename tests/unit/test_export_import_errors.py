"""Bad import inputs fail with a message naming the file, key, shapes and config (no raw traceback): a
truncated .safetensors, a config.json that does not describe its weights, an `--arch` other than the
weights'. And what exports record: an HF export names the SigLIP `logit_bias` it cannot carry; an open_clip
export records its destination's name, not the staging folder's."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_weights

from data_pipelines.tokenizer import TextTokenizer
from pretrain.checkpoint.convert import convert, import_checkpoint
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.export.common import left_out_parts
from pretrain.export.hf import export_hf
from pretrain.models import PretrainModel

pytest.importorskip("safetensors")

SMALL = ["model.image_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.layers=2",
         "model.vision.heads=2", "model.text.width=48", "model.text.layers=2", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=24", "model.decoder.width=32",
         "model.decoder.layers=1", "model.decoder.heads=2"]


def _hf_folder(path: Path, tok: TextTokenizer, extra: tuple[str, ...] = ()) -> tuple[Path, PretrainModel]:
    cfg = load_config(None, [*SMALL, *extra])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    path.mkdir()
    export_hf(model.state_dict(), cfg, tok.to_json(), path)
    return path, model


def _edit_config(folder: Path, **text: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in text.items():
        if key == "projection_dim":
            config[key] = config["text_config"][key] = config["vision_config"][key] = value
        else:
            config["text_config"][key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_truncated_safetensors_is_named(tmp_path: Path, tiny_tok: TextTokenizer, capsys):
    src, _ = _hf_folder(tmp_path / "hf", tiny_tok)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"hf/model\.safetensors: not a readable \.safetensors file"):
        import_checkpoint("hf", src, tmp_path / "a")
    assert main(["convert", "--from", "hf", str(src), str(tmp_path / "b")]) == 2
    assert "model.safetensors: not a readable .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_json_that_does_not_describe_the_weights(tmp_path: Path, tiny_tok: TextTokenizer, capsys):
    src, _ = _hf_folder(tmp_path / "hf", tiny_tok)
    _edit_config(src, hidden_size=64, intermediate_size=256)  # text width 48 in the weights
    key = r"'text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight'"
    with pytest.raises(ValueError, match=key + r" has shape \[48, 48\] in the weights but .*hf/config\.json "
                                               r"implies \[64, 64\]"):
        import_checkpoint("hf", src, tmp_path / "a")
    # a mismatch outside the attention reaches the model: named before load_state_dict
    src2, _ = _hf_folder(tmp_path / "hf2", tiny_tok)
    _edit_config(src2, projection_dim=16)
    assert main(["convert", "--from", "hf", str(src2), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert ("'visual.proj' has shape [64, 24] in the weights but [64, 16] in the model its config "
            "describes") in err
    assert "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_arch_that_does_not_match_the_weights(tmp_path: Path, tiny_tok: TextTokenizer, capsys):
    pytest.importorskip("open_clip")
    from pretrain.export.open_clip import WEIGHT_FILE, export_open_clip

    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    (tmp_path / "oc").mkdir()
    export_open_clip(PretrainModel.from_config(cfg, tiny_tok).state_dict(), cfg, tiny_tok.to_json(),
                     tmp_path / "oc")
    weights = tmp_path / "oc" / WEIGHT_FILE
    args = ["convert", "--from", "open_clip", str(weights), str(tmp_path / "a"), "--arch", "ViT-B-32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("(--arch ViT-B-32): 'visual.transformer.resblocks.0.attn.in_proj_weight' has shape [192, 64] in "
            "the weights but --arch ViT-B-32 implies [2304, 768]") in err, err
    assert not (tmp_path / "a").exists()


def test_hf_export_names_the_siglip_logit_bias_it_leaves_out(tmp_path: Path, tiny_tok: TextTokenizer):
    from safetensors import safe_open

    src, model = _hf_folder(tmp_path / "hf", tiny_tok, ("objectives.contrastive.loss=siglip",))
    names = list(model.state_dict())
    assert "logit_bias" in names
    with safe_open(str(src / "model.safetensors"), "pt") as f:  # CLIPModel has no place for it
        assert "logit_bias" not in set(f.keys())
    assert "logit_bias" not in (src / "config.json").read_text()
    assert left_out_parts(names, "hf") == ["decoder", "logit_bias", "mlm_head"]
    assert left_out_parts(names, "open_clip") == ["decoder", "mlm_head"]  # open_clip's CLIP keeps it
    # and `pretrain convert --to hf` says so in its summary and manifest
    weights = write_tiny_weights(tmp_path / "w", tiny_tok, overrides=("objectives.contrastive.loss=siglip",))
    summary = convert(weights, tmp_path / "hf-out", "hf")
    manifest = json.loads((tmp_path / "hf-out" / "manifest.json").read_text())
    assert "logit_bias" in summary["left_out"] and "logit_bias" in manifest["left_out"]


def test_open_clip_export_records_the_destination_name(tmp_path: Path, tiny_tok: TextTokenizer):
    weights = write_tiny_weights(tmp_path / "weights", tiny_tok)
    convert(weights, tmp_path / "my-oc-export", "open_clip")
    config = json.loads((tmp_path / "my-oc-export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "my-oc-export"


def test_convert_tells_the_open_clip_export_its_destination_name(tmp_path: Path, tiny_tok: TextTokenizer,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """`pretrain convert` passes DST's name to the writer: nothing works it out from how the staging folder
    is named (here `staging-area`, renamed to DST once complete)."""
    from pretrain.checkpoint import convert as convert_module

    @contextlib.contextmanager
    def staged(dst: Path, overwrite: bool = False):
        tmp = Path(dst).parent / "staging-area"
        tmp.mkdir()
        yield tmp
        os.replace(tmp, dst)

    monkeypatch.setattr(convert_module, "staged_output", staged)
    weights = write_tiny_weights(tmp_path / "weights", tiny_tok)
    convert(weights, tmp_path / "my-oc-export", "open_clip")
    config = json.loads((tmp_path / "my-oc-export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "my-oc-export"
