"""`pretrain convert --to onnx`: the real torch exporter and onnxruntime on a tiny random-weight model.

fp32 graphs reproduce the eager encoders at several batch sizes (dynamic batch); fp16/int8 graphs really
are converted (their weights change type) and stay close; onnxruntime's fusions fire on the exported
graphs (op counts: the session's own and onnxruntime.transformers' optimizer); static int8 needs
calibration data; a layer the exporter cannot handle is named; a failure leaves no folder; and the folder
runs in a subprocess where `import torch` raises, through `pretrain/export/onnx_runtime.py` alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from procs import BLOCK_TORCH
from tiny import write_tiny_weights

from pretrain.checkpoint.convert import convert
from pretrain.cli import main
from pretrain.evaluation.evaluate import load_model
from pretrain.export.onnx import (
    OPSET,
    ExportError,
    _export,
    _ImageEncoder,
    export_onnx,
    runtime_tokenizer_json,
)
from pretrain.export.onnx_fuse import op_counts, transformers_optimize
from pretrain.export.onnx_runtime import OnnxCLIP

ROOT = Path(__file__).resolve().parents[2]
ORT = tuple(int(x) for x in __import__("onnxruntime").__version__.split(".")[:2])
FUSES_ALL = ORT >= (1, 25)
"""onnxruntime.transformers' optimizer fuses the attention of every layer from 1.25 on (1.23.2 and 1.24.4,
measured, leave one layer of the image tower unfused; Python 3.10's newest wheel is 1.23.2)."""
RUNTIME = ROOT / "pretrain" / "export" / "onnx_runtime.py"
CAPTIONS = ["a red square", "a small blue circle on the left of a large green triangle", "", "x",
            "a red [EOS] square [PAD] [MASK]"]  # special-token strings typed in a caption are text


@pytest.fixture(scope="module")
def weights(tiny_tok, tmp_path_factory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("onnx") / "weights", tiny_tok)


@pytest.fixture(scope="module")
def eager(weights):
    return load_model(weights)


@pytest.fixture(scope="module")
def fp32(weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "onnx"
    convert(weights, out, "onnx", "fp32")
    return out


def _inputs(cfg, tok, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = cfg.model.image_size
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" * (i % 3) for i in range(n)]
    return torch.randn(n, 3, S, S, generator=g), tok.encode_batch(texts, cfg.model.text.context_length)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_fp32_matches_eager_at_every_batch_size(fp32, eager):
    model, tok, cfg = eager
    clip = OnnxCLIP(fp32, providers=["CPUExecutionProvider"])
    for n in (1, 2, 7):
        images, ids = _inputs(cfg, tok, n, seed=n)
        img, txt = clip.encode_pixels(images.numpy()), clip.encode_ids(ids.numpy())
        assert img.shape == txt.shape == (n, cfg.model.embed_dim) and img.dtype == np.float32
        np.testing.assert_allclose(img, model.encode_image(images).numpy(), atol=2e-5)
        np.testing.assert_allclose(txt, model.encode_text(ids).numpy(), atol=2e-5)
    # the runtime's own tokenizer gives the training tokenizer's ids
    np.testing.assert_array_equal(clip.tokenize(CAPTIONS), tok.encode_batch(CAPTIONS, 16).numpy())


def test_chunked_batches_give_the_whole_batch_embeddings(fp32, eager):
    """`split`: a batch of >= 2 rows per worker runs as one chunk per worker on single-threaded sessions;
    rows and their order are those of the whole-batch run (fp32: equal to float precision)."""
    model, tok, cfg = eager
    whole = OnnxCLIP(fp32, providers=["CPUExecutionProvider"], threads=2, split=False)
    chunked = OnnxCLIP(fp32, providers=["CPUExecutionProvider"], threads=2, split=True)
    assert chunked.split and set(chunked._single) == {"image", "text"} and not whole._single
    for n in (3, 4, 9):  # 3: below 2 rows per worker, the multi-threaded session; 9: uneven chunks
        images, ids = _inputs(cfg, tok, n, seed=n)
        pixels = images.numpy()
        np.testing.assert_allclose(chunked.encode_pixels(pixels), whole.encode_pixels(pixels), atol=1e-6)
        np.testing.assert_allclose(chunked.encode_ids(ids.numpy()), model.encode_text(ids).numpy(), atol=2e-5)
    one_core = OnnxCLIP(fp32, providers=["CPUExecutionProvider"], threads=1)
    assert not one_core.split  # nothing to split


def test_folder_has_manifest_tokenizer_and_preprocessing(fp32, eager):
    _, tok, cfg = eager
    names = {p.name for p in fp32.iterdir()}
    assert names == {"image.onnx", "text.onnx", "tokenizer.json", "preprocess.json", "manifest.json"}
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["dtype"] == "fp32"
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert min(manifest["check"].values()) >= 0.9999
    pre = json.loads((fp32 / "preprocess.json").read_text())
    assert (pre["image_size"], pre["context_length"]) == (32, 16)
    assert pre["mean"] == list(cfg.data.mean) and pre["std"] == list(cfg.data.std) and pre["crop"] == "center"
    batch_dim = onnx.load(str(fp32 / "image.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic, not a traced constant


def _towers(cfg) -> list[tuple[str, str, object]]:
    return [("image", "image.onnx", cfg.model.vision), ("text", "text.onnx", cfg.model.text)]


def test_onnxruntime_fusions_fire_on_the_export(fp32, eager, tmp_path):
    """The export is written so that onnxruntime's fusions match it; op counts, so a change to the
    attention, the MLP or the opset that breaks a pattern fails here (speed is in docs/benchmarks.md)."""
    model, _, cfg = eager
    graph = json.loads((fp32 / "manifest.json").read_text())["graph"]
    assert graph["optimizer"] is None
    assert graph["session"]["cpu_disabled_optimizers"] == ["SkipLayerNormFusion"]
    for tower, name, m in _towers(cfg):
        ops, session = graph["ops"][tower], graph["session_ops"][tower]
        assert ops == op_counts(fp32 / name) and "Split" not in ops  # q, k, v: three projections, no copy
        # what the CPU session runs: q @ k^T with the scale folded into one FusedMatMul per layer, the Erf
        # chain as Gelu (bias included in fp32), and no SkipLayerNormalization (disabled: slower here)
        assert session.get("FusedMatMul") == m.layers, (tower, session)
        assert session.get("BiasGelu", 0) + session.get("Gelu", 0) == m.layers, (tower, session)
        assert "SkipLayerNormalization" not in session and "Softmax" in session
        # onnxruntime.transformers' optimizer fuses every layer of our graph
        stats = transformers_optimize(fp32 / name, tmp_path / name, tower, m.heads, m.width)
        fused = stats.get("Attention")
        assert fused == m.layers or (not FUSES_ALL and fused), (tower, stats)
        assert stats.get("SkipLayerNormalization") == 2 * m.layers, (tower, stats)
        assert stats.get("BiasGelu") == m.layers, (tower, stats)
    # the check can fail: the training Attention traced as is (packed q/k/v, unbound by a Split) fuses none
    raw = tmp_path / "packed.onnx"
    _export(_ImageEncoder(model.visual).eval(), torch.randn(2, 3, 32, 32), "pixel_values", raw)
    assert OPSET == 17 and "Split" in op_counts(raw)
    stats = transformers_optimize(raw, tmp_path / "packed-fused.onnx", "image", 2, 32)
    assert stats.get("Attention", 0) == 0


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_transformers_optimizer_export(weights, eager, tmp_path, dtype):
    """`--optimizer transformers`: fused before quantisation (int8: QAttention), recorded in the manifest,
    and still the eager model (fp32 passes the export's own cosine >= 0.9999 check)."""
    model, tok, cfg = eager
    out = tmp_path / dtype
    summary = convert(weights, out, "onnx", dtype, optimizer="transformers")
    assert summary["optimizer"] == "transformers"
    graph = json.loads((out / "manifest.json").read_text())["graph"]
    assert graph["optimizer"].startswith("onnxruntime.transformers")
    for tower, _, m in _towers(cfg):
        fused = graph["fused_operators"][tower]["Attention"]
        assert fused == m.layers or (not FUSES_ALL and fused), (tower, fused)  # older: at least one
        assert graph["ops"][tower].get("QAttention" if dtype == "int8" else "Attention") == fused
    clip = OnnxCLIP(out, providers=["CPUExecutionProvider"])
    images, ids = _inputs(cfg, tok, 5)
    floor = 0.9999 if dtype == "fp32" else 0.98
    assert _cos(clip.encode_pixels(images.numpy()), model.encode_image(images).numpy()).min() > floor
    assert _cos(clip.encode_ids(ids.numpy()), model.encode_text(ids).numpy()).min() > floor  # causal kept


def _initializer_types(path: Path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("dtype, weight_type, min_cos", [
    ("fp16", onnx.TensorProto.FLOAT16, 0.999),
    ("int8", onnx.TensorProto.INT8, 0.98),
])
def test_fp16_and_int8_are_converted_and_stay_close(weights, eager, tmp_path, dtype, weight_type, min_cos):
    model, tok, cfg = eager
    out = tmp_path / dtype
    summary = convert(weights, out, "onnx", dtype)
    assert summary["dtype"] == dtype
    for name in ("image.onnx", "text.onnx"):
        assert weight_type in _initializer_types(out / name), name
    clip = OnnxCLIP(out, providers=["CPUExecutionProvider"])
    images, ids = _inputs(cfg, tok, 6)
    img, txt = clip.encode_pixels(images.numpy()), clip.encode_ids(ids.numpy())
    assert img.dtype == txt.dtype == np.float32  # fp32 in and out at every dtype
    assert _cos(img, model.encode_image(images).numpy()).min() > min_cos
    assert _cos(txt, model.encode_text(ids).numpy()).min() > min_cos
    if dtype == "int8":  # every weight MatMul runs quantised; q, k, v share one activation quantisation
        session = json.loads((out / "manifest.json").read_text())["graph"]["session_ops"]
        for tower, _, m in _towers(cfg):
            ops = session[tower]
            quantised = ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0)
            assert quantised == 6 * m.layers + 1, (tower, ops)  # q, k, v, proj, fc1, fc2; the projection
            assert ops.get("DynamicQuantizeLinear") == m.layers, (tower, ops)


def test_static_int8_needs_calibration_then_calibrates(weights, shards, tmp_path, capsys):
    out = tmp_path / "static"
    assert main(["convert", str(weights), str(out), "--to", "onnx", "--dtype", "int8",
                 "--quant", "static"]) == 2
    assert "needs calibration data: pass --calibration" in capsys.readouterr().err
    assert not out.exists()
    summary = convert(weights, out, "onnx", "int8", quant="static", calibration=shards["val"],
                      calibration_samples=64)
    assert summary["quantization"] == "static"
    ops = {n.op_type for n in onnx.load(str(out / "image.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations quantised with calibrated ranges
    assert json.loads((out / "manifest.json").read_text())["calibration"]["samples"] == 64


class _Histogram(torch.nn.Module):
    """An activation built on aten::histc, which the ONNX exporter has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x) + torch.histc(x, bins=4).sum() * 0


def test_unexportable_layer_is_named_and_nothing_is_left(eager, weights, tmp_path, monkeypatch):
    import copy

    import pretrain.evaluation.evaluate as evaluate

    model, tok, cfg = eager
    model = copy.deepcopy(model)
    model.visual.transformer.resblocks[1].mlp.act = _Histogram()
    (tmp_path / "x").mkdir()
    with pytest.raises(ExportError, match=r"image encoder .*'visual\.transformer\.resblocks\.1\.mlp\.act' "
                                          r"\(_Histogram\).*histc"):
        export_onnx(model, tok, cfg, tmp_path / "x")
    # through `pretrain convert`: the staged folder is removed, DST never appears
    monkeypatch.setattr(evaluate, "load_model", lambda src: (model, tok, cfg))
    out = tmp_path / "out" / "onnx"
    with pytest.raises(ExportError, match="resblocks.1.mlp.act"):
        convert(weights, out, "onnx", "fp32")
    assert list((tmp_path / "out").iterdir()) == []


def test_convert_cli_errors_leave_nothing(weights, tmp_path, capsys):
    assert main(["convert", str(weights), str(tmp_path / "a"), "--to", "onnx", "--dtype", "bf16"]) == 2
    assert "choose one of fp32, fp16, int8" in capsys.readouterr().err
    assert main(["convert", str(weights), str(tmp_path / "b"), "--to", "onnx", "--calibration", "x.tar"]) == 2
    assert "apply to --dtype int8" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    assert main(["convert", str(weights), str(tmp_path / "c"), "--to", "onnx"]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_runs_in_a_process_without_torch(fp32, eager, tmp_path):
    """The serving path: only onnxruntime, numpy, tokenizers and PIL; `import torch` raises."""
    model, tok, cfg = eager
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):  # 32 x 32: the centre crop is the identity, so eager sees the same pixels
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    np.save(tmp_path / "want_img.npy", model.encode_image(x).numpy())
    np.save(tmp_path / "want_txt.npy", model.encode_text(tok.encode_batch(CAPTIONS, 16)).numpy())
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import importlib.util, json, sys
        import numpy as np
        from PIL import Image
        spec = importlib.util.spec_from_file_location("onnx_runtime", {str(RUNTIME)!r})
        rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
        clip = rt.OnnxCLIP({str(fp32)!r}, providers=["CPUExecutionProvider"])
        img = clip.encode_images([Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(3)])
        txt = clip.encode_texts({CAPTIONS!r})
        d_img = np.abs(img - np.load({str(tmp_path / "want_img.npy")!r})).max()
        d_txt = np.abs(txt - np.load({str(tmp_path / "want_txt.npy")!r})).max()
        print(json.dumps({{"img": float(d_img), "txt": float(d_txt), "torch": "torch" in sys.modules}}))
        try:
            import torch
        except ImportError as e:
            print("blocked:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[0])
    assert result["torch"] is False and "blocked: torch is blocked" in r.stdout
    assert result["img"] < 2e-5 and result["txt"] < 2e-5, result


# ---------------------------------------------------------- OpenAI CLIP's tokenizer (data.tokenizer=clip)
CLIP_CAPTIONS = ["A Photo of a  CAT", "fish &amp; chips", "cafÃ© on the left!!", "", "!!!",
                 "<start_of_text> tags <end_of_text> typed in", "a very long caption " * 10,
                 "  Ünïcode\twords \n"]


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """A weights export of a random-init TINY_INFER model trained with `data.tokenizer=clip`."""
    from tiny import TINY_INFER

    from data_pipelines.clip_tokenizer import ClipTokenizer
    from pretrain.checkpoint.sources import DictSource
    from pretrain.checkpoint.universal import write_weights
    from pretrain.config import embedded_config_path, load_config, to_dict
    from pretrain.models.pretrain_model import PretrainModel

    tok = ClipTokenizer()
    cfg = load_config(embedded_config_path(), [*TINY_INFER, "data.tokenizer=clip"])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    folder = tmp_path_factory.mktemp("onnx-clip") / "weights"
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random init"), folder, overwrite=True)
    return folder


def test_clip_tokenizer_export_tokenizes_and_pools_as_training(clip_weights, tmp_path):
    """A `data.tokenizer=clip` model: the folder carries CLIP's tokenizer as a `tokenizers` JSON with its
    own special ids (49406/49407, padding 0) and argmax pooling; `OnnxCLIP` gives exactly the training
    tokenizer's ids (CLIP's clean-up included) and the eager model's embeddings, also without torch."""
    from data_pipelines.clip_tokenizer import EOT_ID, SOT_ID

    model, tok, cfg = load_model(clip_weights)
    assert model.text.pool_type == "argmax"
    out = tmp_path / "onnx"
    summary = convert(clip_weights, out, "onnx", "fp32")
    assert min(summary["check"].values()) >= 0.9999
    pre = json.loads((out / "preprocess.json").read_text())
    assert (pre["sos_id"], pre["eos_id"], pre["pad_id"]) == (SOT_ID, EOT_ID, 0)
    assert pre["text_clean"] == "clip" and "argmax" in pre["pooling"]["text"]
    clip = OnnxCLIP(out, providers=["CPUExecutionProvider"])
    want_ids = tok.encode_batch(CLIP_CAPTIONS, 16).numpy()
    np.testing.assert_array_equal(clip.tokenize(CLIP_CAPTIONS), want_ids)
    assert (want_ids == 0).any() and (want_ids[:, -1] == EOT_ID).any()  # padding "!" ids and a cut caption
    want_txt = model.encode_text(torch.from_numpy(want_ids)).numpy()
    np.testing.assert_allclose(clip.encode_texts(CLIP_CAPTIONS), want_txt, atol=2e-5)

    np.save(tmp_path / "want_ids.npy", want_ids)
    np.save(tmp_path / "want_txt.npy", want_txt)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import importlib.util, json, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location("onnx_runtime", {str(RUNTIME)!r})
        rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
        clip = rt.OnnxCLIP({str(out)!r}, providers=["CPUExecutionProvider"], towers=("text",))
        ids, txt = clip.tokenize({CLIP_CAPTIONS!r}), clip.encode_texts({CLIP_CAPTIONS!r})
        same = bool((ids == np.load({str(tmp_path / "want_ids.npy")!r})).all())
        d_txt = np.abs(txt - np.load({str(tmp_path / "want_txt.npy")!r})).max()
        print(json.dumps({{"same_ids": same, "txt": float(d_txt), "torch": "torch" in sys.modules}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[0])
    assert result == {"same_ids": True, "txt": result["txt"], "torch": False} and result["txt"] < 2e-5, result


def test_the_clip_runtime_tokenizer_json_comes_through_the_tokenizers_public_accessor():
    """The export asks a CLIP tokenizer for its `tokenizers` JSON (`ClipTokenizer.runtime_json`) instead of
    reaching into its private state, so any tokenizer with that interface exports."""
    from tokenizers import Tokenizer

    from data_pipelines.clip_tokenizer import EOT_ID, SOT_ID, ClipTokenizer

    class OtherArgmaxTokenizer:  # no private `_tok`: the accessor is all the export may use
        pool_type = "argmax"

        def runtime_json(self) -> str:
            return '{"version": "1.0"}'

    assert runtime_tokenizer_json(OtherArgmaxTokenizer()) == '{"version": "1.0"}'
    tok = ClipTokenizer()
    runtime = Tokenizer.from_str(runtime_tokenizer_json(tok))
    ids = runtime.encode("a photo of a cat", add_special_tokens=False).ids
    assert tok.encode_batch(["a photo of a cat"], 16)[0, :len(ids) + 2].tolist() == [SOT_ID, *ids, EOT_ID]


def test_clip_tokenizer_model_through_embed_onnx_backend(clip_weights):
    """`pretrain embed --backend onnx` / `bench infer` export on the fly the same way: the ONNX encoder of a
    CLIP-tokenizer model gives the torch encoder's text embeddings."""
    from pretrain.evaluation.encoders import open_encoder

    with open_encoder(clip_weights, "torch", device="cpu") as (eager, tok, cfg):
        ids = tok.encode_batch(CLIP_CAPTIONS, cfg.model.text.context_length)
        want = eager.encode_text(ids)
    with open_encoder(clip_weights, "onnx") as (onnx_enc, _, _):
        assert onnx_enc.clip.text_clean == "clip"
        np.testing.assert_array_equal(onnx_enc.clip.tokenize(CLIP_CAPTIONS), ids.numpy())
        torch.testing.assert_close(onnx_enc.encode_text(ids), want, atol=2e-5, rtol=0)
