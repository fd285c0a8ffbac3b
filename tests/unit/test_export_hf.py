"""Export to / import from Hugging Face `transformers` CLIP: the library loads our folder with no missing or
unexpected keys and gives our embeddings; a CLIPModel built by the library imports into PretrainModel and
gives its embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from data_pipelines.tokenizer import EOS_ID, PAD_ID, SOS_ID, TextTokenizer
from pretrain.config import Config, load_config
from pretrain.export.hf import export_hf, import_hf
from pretrain.models import PretrainModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SMALL = ["model.image_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.layers=2",
         "model.vision.heads=2", "model.text.width=48", "model.text.layers=2", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=24", "model.decoder.width=32",
         "model.decoder.layers=1", "model.decoder.heads=2", "data.mean=[0.5,0.4,0.3]",
         "data.std=[0.2,0.25,0.3]"]
TEXTS = ["a red square on a blue background", "green circle", "", "a red [EOS] square [PAD] [MASK]",
         "a very long caption " * 10]  # special-token strings are text; the last one is truncated


def _model(cfg: Config, tiny_tok: TextTokenizer, seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    return PretrainModel.from_config(cfg, tiny_tok).eval()


def _perturbed(model: PretrainModel) -> PretrainModel:
    """Random norms and biases too (init sets them to 1/0, which would hide a mix-up of those)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hf_embeddings(hf, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=images)
        txt = hf.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)  # some versions return a model output here
    txt = getattr(txt, "pooler_output", txt)
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_loads_in_transformers_with_equal_embeddings(tmp_path: Path, tiny_tok: TextTokenizer,
                                                            act: str):
    cfg = load_config(None, [*SMALL, f"model.activation={act}"])
    model = _perturbed(_model(cfg, tiny_tok))
    export_hf(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path)

    hf, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    assert hf.config.text_config.hidden_act == act and hf.config.vision_config.layer_norm_eps == 1e-5
    assert hf.config.text_config.vocab_size == model.vocab_size
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok(TEXTS, padding="max_length", max_length=hf_tok.model_max_length, truncation=True,
                 return_tensors="pt").input_ids
    ours_ids = tiny_tok.encode_batch(TEXTS, cfg.model.text.context_length)
    assert torch.equal(ids, ours_ids)

    images = _images()
    hf_img, hf_txt = _hf_embeddings(hf, images, ids)
    assert _max_diff(hf_img, model.encode_image(images)) < 1e-4
    assert _max_diff(hf_txt, model.encode_text(ids)) < 1e-4


def test_export_writes_processor_and_config_files(tmp_path: Path, tiny_tok: TextTokenizer):
    cfg = load_config(None, SMALL)
    export_hf(_model(cfg, tiny_tok).state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    proc = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    assert proc.crop_size == {"height": 32, "width": 32}
    assert list(proc.image_mean) == cfg.data.mean and list(proc.image_std) == cfg.data.std
    text_cfg = json.loads((tmp_path / "config.json").read_text())["text_config"]
    ids = (text_cfg["pad_token_id"], text_cfg["bos_token_id"], text_cfg["eos_token_id"])
    assert ids == (PAD_ID, SOS_ID, EOS_ID)
    assert text_cfg["max_position_embeddings"] == 16


def test_export_of_live_parameters_warns_nothing(tmp_path: Path, tiny_tok: TextTokenizer):
    """An in-process caller may pass the model's parameters themselves (requires_grad): the export reads
    them without autograd (torch warned on `float()` of the logit scale) and writes the same files."""
    cfg = load_config(None, SMALL)
    model = _model(cfg, tiny_tok)
    params = dict(model.named_parameters())
    live = {k: params.get(k, v) for k, v in model.state_dict().items()}
    assert live["logit_scale"].requires_grad
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise: an earlier test would hide it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            export_hf(live, cfg, tiny_tok.to_json(), tmp_path)
        finally:
            torch.set_warn_always(always)
    (tmp_path / "plain").mkdir()
    export_hf(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path / "plain")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_bf16_export_stores_bf16(tmp_path: Path, tiny_tok: TextTokenizer):
    from safetensors import safe_open

    cfg = load_config(None, SMALL)
    model = _model(cfg, tiny_tok)
    export_hf(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.CLIPModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_img, _ = _hf_embeddings(hf, _images(), tiny_tok.encode_batch(TEXTS, 16))
    assert _max_diff(hf_img, model.encode_image(_images())) < 5e-2  # bf16 rounding only


def test_export_refuses_config_of_other_weights(tmp_path: Path, tiny_tok: TextTokenizer):
    cfg = load_config(None, SMALL)
    state = _model(cfg, tiny_tok).state_dict()
    other = load_config(None, [*SMALL, "model.vision.width=32"])
    with pytest.raises(ValueError, match="visual"):
        export_hf(state, other, tiny_tok.to_json(), tmp_path)


def _library_model(tmp_path: Path, tiny_tok: TextTokenizer, act: str, **text_overrides):
    torch.manual_seed(3)
    text = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=3, max_position_embeddings=16, hidden_act=act, pad_token_id=PAD_ID,
                bos_token_id=SOS_ID, eos_token_id=EOS_ID)
    text.update(text_overrides)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act=act)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=20, logit_scale_init_value=3.0)).eval()
    with torch.no_grad():  # HF initialises norms/biases to 1/0 too
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tiny_tok.to_json())
    return hf


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_import_of_library_model_gives_its_embeddings(tmp_path: Path, tiny_tok: TextTokenizer, act: str):
    hf = _library_model(tmp_path, tiny_tok, act)
    state, overrides, tok_json = import_hf(tmp_path)
    assert tok_json == tiny_tok.to_json()
    assert overrides["model.vision.layers"] == 3 and overrides["model.text.heads"] == 3
    assert overrides["model.activation"] == act and overrides["model.mlp_ratio"] == 2.0

    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    model = _model(cfg, tiny_tok, seed=11)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("decoder.", "mlm_head.")) for k in missing), missing
    assert model.vocab_size == 256

    ids = tiny_tok.encode_batch(TEXTS, 16)
    hf_img, hf_txt = _hf_embeddings(hf, _images(), ids)
    assert _max_diff(hf_img, model.encode_image(_images())) < 1e-4
    assert _max_diff(hf_txt, model.encode_text(ids)) < 1e-4
    assert model.logit_scale.item() == pytest.approx(3.0)


def test_round_trip_export_import_is_lossless(tmp_path: Path, tiny_tok: TextTokenizer):
    cfg = load_config(None, SMALL)
    model = _perturbed(_model(cfg, tiny_tok))
    export_hf(model.state_dict(), cfg, tiny_tok.to_json(), tmp_path)
    state, overrides, _ = import_hf(tmp_path)
    assert overrides["data.mean"] == cfg.data.mean
    ours = model.state_dict()
    assert set(state) == {k for k in ours if k.startswith(("visual.", "text.")) or k == "logit_scale"}
    assert all(torch.equal(state[k], ours[k]) for k in state)


def test_import_rejects_other_pooling_token(tmp_path: Path, tiny_tok: TextTokenizer):
    _library_model(tmp_path, tiny_tok, "gelu", eos_token_id=2)
    with pytest.raises(ValueError, match="eos_token_id 2"):
        import_hf(tmp_path)


def test_import_rejects_per_tower_mlp_ratio(tmp_path: Path, tiny_tok: TextTokenizer):
    _library_model(tmp_path, tiny_tok, "gelu")
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 192
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MLP ratios"):
        import_hf(tmp_path)


def test_import_rejects_checkpoint_with_extra_weights(tmp_path: Path, tiny_tok: TextTokenizer):
    from safetensors.torch import load_file, save_file

    _library_model(tmp_path, tiny_tok, "gelu")
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["vision_model.extra_head.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="extra_head"):
        import_hf(tmp_path)
