"""Export to / import from open_clip: `open_clip.create_model_from_pretrained("local-dir:...")` loads our
folder strictly and gives our embeddings with our tokenizer's ids; an open_clip CLIP built by the library
imports into PretrainModel and gives its embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.tokenizer import EOS_ID, TextTokenizer
from pretrain.config import Config, load_config
from pretrain.export.open_clip import CONFIG_FILE, WEIGHT_FILE, export_open_clip, import_open_clip
from pretrain.models import PretrainModel

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")  # open_clip's HFTokenizer reads our tiny_tok through it

SMALL = ["model.image_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.layers=2",
         "model.vision.heads=2", "model.text.width=48", "model.text.layers=2", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=24", "model.decoder.width=32",
         "model.decoder.layers=1", "model.decoder.heads=2", "data.mean=[0.5,0.4,0.3]",
         "data.std=[0.2,0.25,0.3]"]
TEXTS = ["a red square on a blue background", "green circle", "", "a very long caption " * 10]


def _model(cfg: Config, tiny_tok: TextTokenizer, seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    model = PretrainModel.from_config(cfg, tiny_tok).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random norms and biases too: init's 1/0 would hide a mix-up of those
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_loads_in_open_clip_with_equal_embeddings(tmp_path: Path, tiny_tok: TextTokenizer, act: str):
    cfg = load_config(None, [*SMALL, f"model.activation={act}"])
    model = _model(cfg, tiny_tok)
    export_open_clip(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    assert (tmp_path / WEIGHT_FILE).is_file()

    # strict load inside open_clip: a missing or unexpected key raises here
    oc, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path}")
    oc.eval()
    oc_tok = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    ids = oc_tok(TEXTS)
    assert torch.equal(ids, tiny_tok.encode_batch(TEXTS, cfg.model.text.context_length))

    with torch.no_grad():
        img = oc.encode_image(_images(), normalize=True)
        txt = oc.encode_text(ids, normalize=True)
    assert _max_diff(img, model.encode_image(_images())) < 1e-4
    assert _max_diff(txt, model.encode_text(ids)) < 1e-4
    assert oc.logit_scale.item() == pytest.approx(model.logit_scale.item())
    crop = [t for t in preprocess.transforms if type(t).__name__ == "CenterCrop"]
    assert crop and list(crop[0].size) == [32, 32]


def test_export_keeps_siglip_logit_bias(tmp_path: Path, tiny_tok: TextTokenizer):
    cfg = load_config(None, [*SMALL, "objectives.contrastive.loss=siglip"])
    model = _model(cfg, tiny_tok)
    export_open_clip(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    oc = open_clip.create_model(f"local-dir:{tmp_path}")
    assert oc.logit_bias.item() == pytest.approx(model.logit_bias.item())
    state, overrides, _ = import_open_clip(tmp_path)
    assert overrides["objectives.contrastive.loss"] == "siglip"
    assert torch.equal(state["logit_bias"], model.logit_bias.detach())


def test_export_of_live_parameters_warns_nothing(tmp_path: Path, tiny_tok: TextTokenizer):
    """The model's own parameters (requires_grad, as an in-process caller has them), SigLIP bias included:
    no autograd warning from reading the logit scale and bias, and the same files as from a state dict."""
    cfg = load_config(None, [*SMALL, "objectives.contrastive.loss=siglip"])
    model = _model(cfg, tiny_tok)
    params = dict(model.named_parameters())
    live = {k: params.get(k, v) for k, v in model.state_dict().items()}
    assert live["logit_bias"].requires_grad
    (tmp_path / "live").mkdir()
    (tmp_path / "plain").mkdir()
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise: an earlier test would hide it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            export_open_clip(live, cfg, tiny_tok.to_json(), tmp_path / "live", name="x")
        finally:
            torch.set_warn_always(always)
    export_open_clip(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path / "plain", name="x")
    for name in (WEIGHT_FILE, CONFIG_FILE):
        assert (tmp_path / "live" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_bf16_export_stores_bf16(tmp_path: Path, tiny_tok: TextTokenizer):
    from safetensors.torch import load_file

    cfg = load_config(None, SMALL)
    export_open_clip(_model(cfg, tiny_tok).state_dict(), cfg, tiny_tok.to_json(), tmp_path,
                     dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(tmp_path / WEIGHT_FILE)).values()} == {torch.bfloat16}
    open_clip.create_model(f"local-dir:{tmp_path}")  # still loads (cast to the model's fp32)


def _library_model(tmp_path: Path, tiny_tok: TextTokenizer, quick_gelu: bool, **text_cfg):
    model_cfg = {
        "embed_dim": 20, "quick_gelu": quick_gelu, "init_logit_scale": 3.0,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 48, "heads": 3, "layers": 2,
                     "mlp_ratio": 2.0, "pool_type": "eos", "eos_id": EOS_ID, **text_cfg},
    }
    torch.manual_seed(3)
    oc = open_clip.model.CLIP(**model_cfg).eval()
    with torch.no_grad():  # open_clip initialises norms/biases to 1/0 too
        for name, p in oc.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / WEIGHT_FILE))
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg,
                                                    "preprocess_cfg": {"mean": [0.1, 0.2, 0.3],
                                                                       "std": [0.3, 0.2, 0.1]}}))
    (tmp_path / "tokenizer.json").write_text(tiny_tok.to_json())
    return oc


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_import_of_library_model_gives_its_embeddings(tmp_path: Path, tiny_tok: TextTokenizer,
                                                      quick_gelu: bool):
    oc = _library_model(tmp_path, tiny_tok, quick_gelu)
    state, overrides, tok_json = import_open_clip(tmp_path)
    assert tok_json == tiny_tok.to_json()
    assert overrides["model.activation"] == ("quick_gelu" if quick_gelu else "gelu")
    assert overrides["model.vision.heads"] == 4 and overrides["data.mean"] == [0.1, 0.2, 0.3]

    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    model = _model(cfg, tiny_tok, seed=11)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("decoder.", "mlm_head.")) for k in missing), missing

    ids = tiny_tok.encode_batch(TEXTS, 16)
    with torch.no_grad():
        img = oc.encode_image(_images(), normalize=True)
        txt = oc.encode_text(ids, normalize=True)
    assert _max_diff(img, model.encode_image(_images())) < 1e-4
    assert _max_diff(txt, model.encode_text(ids)) < 1e-4
    assert model.logit_scale.item() == pytest.approx(3.0)


def test_round_trip_export_import_is_lossless(tmp_path: Path, tiny_tok: TextTokenizer):
    cfg = load_config(None, SMALL)
    model = _model(cfg, tiny_tok)
    export_open_clip(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    state, overrides, _ = import_open_clip(tmp_path)
    assert overrides["data.std"] == cfg.data.std and overrides["model.text.context_length"] == 16
    ours = model.state_dict()
    assert set(state) == {k for k in ours if k.startswith(("visual.", "text.")) or k == "logit_scale"}
    assert all(torch.equal(state[k], ours[k]) for k in state)


@pytest.mark.parametrize("text_cfg, match", [
    ({"pool_type": "argmax"}, "pool_type='argmax'"),
    ({"no_causal_mask": True}, "no_causal_mask"),
    ({"ls_init_value": 0.1}, "ls_init_value"),
    ({"mlp_ratio": 4.0}, "MLP ratios"),
])
def test_import_rejects_what_our_towers_cannot_express(tmp_path: Path, tiny_tok: TextTokenizer,
                                                       text_cfg: dict, match: str):
    _library_model(tmp_path, tiny_tok, False, **text_cfg)
    with pytest.raises(ValueError, match=match):
        import_open_clip(tmp_path)


def test_import_rejects_tokenizer_larger_than_table(tmp_path: Path, tiny_tok: TextTokenizer):
    _library_model(tmp_path, tiny_tok, False, vocab_size=64)
    with pytest.raises(ValueError, match="embedding table only 64 rows"):
        import_open_clip(tmp_path)


def test_exported_text_pooling_is_at_eos_not_argmax(tmp_path: Path, tiny_tok: TextTokenizer):
    """Guards the reason for pool_type 'eos': with open_clip's default argmax the same weights give other
    text embeddings for our ids (the [EOS] id 3 is not the highest in a row)."""
    cfg = load_config(None, SMALL)
    export_open_clip(_model(cfg, tiny_tok).state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    ids = tiny_tok.encode_batch(TEXTS[:2], 16)
    eos = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["model_cfg"]["text_cfg"]["pool_type"] = "argmax"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    argmax = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    with torch.no_grad():
        assert _max_diff(F.normalize(eos.encode_text(ids), dim=-1),
                         F.normalize(argmax.encode_text(ids), dim=-1)) > 1e-2
