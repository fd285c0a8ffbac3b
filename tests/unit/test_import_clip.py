"""Importing OpenAI/LAION-style CLIP checkpoints (`pretrain convert --from hf|open_clip [--arch]|openai`):
models built with random weights at small shapes by each library's own constructors, saved as that library
(or OpenAI) saves them, imported, and compared with the library's own forward on the same inputs (image and
text embeddings within 1e-5 in fp32), with OpenAI CLIP's tokenizer and its 49,408-row vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.clip_tokenizer import CLIP_VOCAB_SIZE, EOT_ID, SOT_ID, ClipTokenizer
from pretrain.checkpoint.convert import build_imported_model, import_checkpoint
from pretrain.evaluation.evaluate import load_model

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a red square", "green circle!", "", "a very long caption " * 10, "wow!~ 12 cats"]
TOL = 1e-5


@pytest.fixture(scope="module")
def clip_tok() -> ClipTokenizer:
    return ClipTokenizer()


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _perturb(module: torch.nn.Module, norm_words: tuple[str, ...]) -> None:
    """Random norms and biases (libraries initialise them to 1/0, which would hide a mix-up)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or any(w in name for w in norm_words):
                p.add_(0.1 * torch.randn_like(p))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check_against(dst: Path, encode_image, encode_text, clip_tok: ClipTokenizer, ctx: int, size: int = 32
                   ) -> None:
    """The imported init (read back as `pretrain eval` reads it) gives the library's embeddings."""
    model, tok, cfg = load_model(dst)
    assert isinstance(tok, ClipTokenizer) and cfg.data.tokenizer == "clip"
    assert model.text.pool_type == "argmax"
    ids, images = clip_tok.encode_batch(TEXTS, ctx), _images(size=size)
    with torch.no_grad():
        assert _diff(F.normalize(encode_image(images), dim=-1), model.encode_image(images)) <= TOL
        assert _diff(F.normalize(encode_text(ids), dim=-1), model.encode_text(ids)) <= TOL


def _hf_model(act: str = "quick_gelu", eos: int = 2, vocab: int = CLIP_VOCAB_SIZE):
    torch.manual_seed(3)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, hidden_act=act, eos_token_id=eos,
                bos_token_id=SOT_ID, pad_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act=act)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=24, logit_scale_init_value=2.5)).eval()
    _perturb(hf, ("norm",))
    return hf


def _features(out):
    return getattr(out, "pooler_output", out)


@pytest.mark.parametrize("eos, tokenizer_files", [(2, False), (EOT_ID, True)])
def test_hf_clip_folder_imports_with_clip_tokenizer(tmp_path: Path, clip_tok: ClipTokenizer, eos: int,
                                                    tokenizer_files: bool):
    from pretrain.export.tokenizers import write_clip_tokenizer_files

    hf = _hf_model(eos=eos)
    hf.save_pretrained(tmp_path / "src")
    if tokenizer_files:  # the hub's layout: vocab.json + merges.txt beside the weights
        write_clip_tokenizer_files(tmp_path / "src", 16)
        (tmp_path / "src" / "mmpt_tokenizer.json").unlink()
    else:  # older hub configs: `text_config_dict` overrides `text_config` (transformers reads it so)
        config = json.loads((tmp_path / "src" / "config.json").read_text())
        config["text_config_dict"], config["text_config"] = config["text_config"], {"hidden_act": "gelu"}
        (tmp_path / "src" / "config.json").write_text(json.dumps(config))
        loaded = transformers.CLIPConfig.from_pretrained(tmp_path / "src")
        assert loaded.text_config.hidden_act == "quick_gelu"
    out = import_checkpoint("hf", tmp_path / "src", tmp_path / "init")
    assert out["tokenizer"] == "clip" and out["fresh"] == ["decoder", "mlm_head"]
    assert out["fresh_token_rows"] == [CLIP_VOCAB_SIZE, 49472]
    _check_against(tmp_path / "init", lambda x: _features(hf.get_image_features(pixel_values=x)),
                   lambda ids: _features(hf.get_text_features(input_ids=ids)), clip_tok, 16)
    model, _, _ = load_model(tmp_path / "init")
    theirs = hf.text_model.embeddings.token_embedding.weight
    assert torch.equal(model.text.token_embedding.weight[:CLIP_VOCAB_SIZE], theirs)  # every pretrained row
    assert model.logit_scale.item() == pytest.approx(2.5)


OC_CFG = {"embed_dim": 24, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 16, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2,
                       "layers": 2}}


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_weights_of_a_named_architecture(tmp_path: Path, clip_tok: ClipTokenizer, monkeypatch,
                                                   quick_gelu: bool):
    """`--arch NAME` with NAME's config where open_clip keeps them (a small one, so the weights are quick;
    the real ViT-B/L names are checked at full size on the meta device below)."""
    import pretrain.export.openai as openai_import

    cfg = {**OC_CFG, "quick_gelu": quick_gelu}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "Tiny-ViT.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(openai_import, "_model_configs_dir", lambda: tmp_path / "configs")
    torch.manual_seed(4)
    oc = open_clip.model.CLIP(**cfg).eval()
    _perturb(oc, ("ln",))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}},
               tmp_path / "epoch_3.pt")  # open_clip's training checkpoint layout (DDP names)
    out = import_checkpoint("open_clip", tmp_path / "epoch_3.pt", tmp_path / "init", arch="Tiny-ViT")
    assert out["tokenizer"] == "clip"
    _check_against(tmp_path / "init", oc.encode_image, oc.encode_text, clip_tok, 16)
    _, _, ours_cfg = load_model(tmp_path / "init")
    assert ours_cfg.model.activation == ("quick_gelu" if quick_gelu else "gelu")


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-B-16-quickgelu",
                                  "ViT-L-14", "ViT-L-14-quickgelu"])
def test_real_architectures_map_at_full_size(arch: str):
    """Every tensor of open_clip's own model of `arch` finds its place and shape in ours (meta device)."""
    from pretrain.export.open_clip import import_open_clip_weights
    from pretrain.export.openai import OPENAI_MEAN, OPENAI_STD, arch_config

    oc = open_clip.create_model(arch, device="meta")
    pre = {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    state, overrides, tok_json = import_open_clip_weights(oc.state_dict(), arch_config(arch), pre, None, arch)
    model, cfg, fresh, rows = build_imported_model(state, overrides, tok_json, device="meta")
    assert fresh == ["decoder", "mlm_head"] and rows == [CLIP_VOCAB_SIZE, 49472]
    m = cfg.model
    assert (m.image_size, m.vision.patch_size, m.vision.width) == (224, oc.visual.conv1.kernel_size[0],
                                                                     oc.visual.conv1.out_channels)
    assert m.vision.layers == len(oc.visual.transformer.resblocks)
    assert m.text.layers == len(oc.transformer.resblocks)
    assert m.text.width == oc.token_embedding.weight.shape[1] and m.embed_dim == oc.text_projection.shape[1]
    assert m.text.context_length == 77 and m.activation == ("quick_gelu" if "quickgelu" in arch else "gelu")
    assert m.vision.heads == oc.visual.transformer.resblocks[0].attn.num_heads
    assert m.text.heads == oc.transformer.resblocks[0].attn.num_heads
    towers = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("visual", "text", "logit")))
    assert towers == sum(p.numel() for p in oc.parameters()) + (49472 - CLIP_VOCAB_SIZE) * m.text.width


def _openai_model(quick_gelu: bool = True):
    cfg = {"embed_dim": 24, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},  # head width 64
           "text_cfg": {"context_length": 16, "vocab_size": CLIP_VOCAB_SIZE, "width": 64, "heads": 1,
                        "layers": 2}}
    torch.manual_seed(5)
    oc = open_clip.model.CLIP(**cfg).eval()
    _perturb(oc, ("ln",))
    return oc


@pytest.mark.parametrize("form", ["state_dict", "torchscript"])
def test_openai_format_imports(tmp_path: Path, clip_tok: ClipTokenizer, form: str):
    oc = _openai_model()
    if form == "state_dict":
        state = {**oc.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
                 "vocab_size": torch.tensor(CLIP_VOCAB_SIZE)}
        torch.save(state, tmp_path / "ViT-tiny.pt")
    else:  # OpenAI's releases are TorchScript archives, traced like open_clip's `trace_model` does
        traced = torch.jit.trace_module(oc, {"encode_image": (_images(2),),
                                             "encode_text": (torch.zeros(2, 16, dtype=torch.long),)},
                                         check_trace=False)
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    out = import_checkpoint("openai", tmp_path / "ViT-tiny.pt", tmp_path / "init")
    assert out["tokenizer"] == "clip"
    _check_against(tmp_path / "init", oc.encode_image, oc.encode_text, clip_tok, 16)


def test_unmappable_architectures_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match="ModifiedResNet"):
        import_checkpoint("open_clip", tmp_path / "none.bin", tmp_path / "a", arch="RN50")
    with pytest.raises(ValueError, match="multimodal_cfg.*attentional_pool"):
        import_checkpoint("open_clip", tmp_path / "none.bin", tmp_path / "b", arch="coca_ViT-B-32")
    with pytest.raises(ValueError, match="no such model config"):
        import_checkpoint("open_clip", tmp_path / "none.bin", tmp_path / "c", arch="ViT-Q-99")
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="--arch"):
        import_checkpoint("open_clip", tmp_path / "w", tmp_path / "d")
    torch.manual_seed(0)
    rn = open_clip.model.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                              text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1,
                                        "layers": 1})
    torch.save(rn.state_dict(), tmp_path / "RN.pt")
    with pytest.raises(ValueError, match="ModifiedResNet"):
        import_checkpoint("openai", tmp_path / "RN.pt", tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_tokenizer_that_does_not_fit_names_both_sizes(tmp_path: Path):
    from data_pipelines.tokenizer import train_tokenizer

    ours = train_tokenizer([f"caption number {i} of a red square" for i in range(50)], 100)
    ours.save(tmp_path / "ours.json")
    _hf_model().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=rf"{ours.vocab_size} tokens.*--tokenizer clip"):
        import_checkpoint("hf", tmp_path / "clip", tmp_path / "a", tokenizer=str(tmp_path / "ours.json"))
    _hf_model(vocab=50000).save_pretrained(tmp_path / "big")
    sizes = "has 49408 tokens but the checkpoint's token embedding has 50000 rows"
    with pytest.raises(ValueError, match=sizes):
        import_checkpoint("hf", tmp_path / "big", tmp_path / "b")
    with pytest.raises(ValueError, match=sizes):
        import_checkpoint("hf", tmp_path / "big", tmp_path / "c", tokenizer="clip")


def test_laion_hub_folder_layout(tmp_path: Path, clip_tok: ClipTokenizer):
    """A LAION hub folder: open_clip_config.json (text pooling left at open_clip's default, argmax),
    open_clip_pytorch_model.bin and transformers' CLIP tokenizer files (tokenizer.json among them)."""
    from pretrain.export.tokenizers import write_clip_tokenizer_files

    src = tmp_path / "laion"
    src.mkdir()
    torch.manual_seed(6)
    oc = open_clip.model.CLIP(**OC_CFG).eval()
    _perturb(oc, ("ln",))
    torch.save(oc.state_dict(), src / "open_clip_pytorch_model.bin")
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": {}}))
    write_clip_tokenizer_files(tmp_path, 16)  # -> CLIPTokenizer -> the hub's tokenizer.json
    transformers.CLIPTokenizer.from_pretrained(tmp_path).save_pretrained(src)
    for name in ("vocab.json", "merges.txt"):
        (src / name).unlink(missing_ok=True)
    assert "<|endoftext|>" in json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    out = import_checkpoint("open_clip", src, tmp_path / "init")
    assert out["tokenizer"] == "clip"
    _check_against(tmp_path / "init", oc.encode_image, oc.encode_text, clip_tok, 16)

    (src / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 0, "a": 1}}}))
    with pytest.raises(ValueError, match=r"\(2 tokens\) is not OpenAI CLIP's"):
        import_checkpoint("open_clip", src, tmp_path / "other")
