"""`pretrain convert CLASSIFIER DST --to onnx`: a fine-tuned classifier (`train.task=classify`, image tower +
linear head) as `classifier.onnx` + `classnames.txt` + `preprocess.json` + `manifest.json`, on a tiny
random-weight `ClassifierModel` through the real exporter and onnxruntime.

The fp32 graph gives the eager logits at several batch sizes (dynamic batch); `OnnxClassifier` predicts the
classes `ClassifierModel` does, also in a process where `import torch` raises; fp16 / int8 (dynamic and
static, calibrated on images) really convert and keep the top-1 class; `OnnxCLIP` and `OnnxClassifier`
refuse each other's folder by name; bad option combinations fail before anything is written."""

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
from tiny import TINY_INFER, write_tiny_weights

from pretrain.checkpoint.convert import convert
from pretrain.checkpoint.sources import DictSource
from pretrain.checkpoint.universal import write_weights
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config, to_dict
from pretrain.export.onnx import image_preprocess
from pretrain.export.onnx_classifier import export_classifier_onnx
from pretrain.export.onnx_runtime import OnnxClassifier, OnnxCLIP
from pretrain.models.classifier import ClassifierModel

NAMES = ["cat", "dog", "red square", "bird", "a small blue circle"]
RUNTIME = Path(__file__).resolve().parents[2] / "pretrain" / "export" / "onnx_runtime.py"


def _classifier(tok, folder: Path) -> tuple[Path, ClassifierModel, object]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    (folder.parent / "cn.txt").write_text("".join(f"{n}\n" for n in NAMES))
    cfg = load_config(embedded_config_path(), [*TINY_INFER, "train.task=classify",
                                               f"finetune.classnames={folder.parent / 'cn.txt'}"])
    torch.manual_seed(0)
    model = ClassifierModel.from_config(cfg, len(NAMES))
    with torch.no_grad():  # a trained-looking head (the fresh one is all zeros: every logit equal)
        model.head.weight.normal_(0, 5.0)
        model.head.bias.normal_(0, 0.5)
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 7, "classnames": NAMES}
    write_weights(DictSource(model.state_dict(), meta, "fine-tune"), folder, overwrite=True)
    return folder, model.eval(), cfg


@pytest.fixture(scope="module")
def classifier(tiny_tok, tmp_path_factory):
    return _classifier(tiny_tok, tmp_path_factory.mktemp("clf") / "weights")


@pytest.fixture(scope="module")
def fp32(classifier, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clf-onnx") / "onnx"
    return out, convert(classifier[0], out, "onnx", "fp32")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _images(cfg, n: int, seed: int) -> torch.Tensor:
    S = cfg.model.image_size
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def test_fp32_folder_holds_the_graph_classnames_preprocessing_and_manifest(classifier, fp32):
    src, model, cfg = classifier
    out, summary = fp32
    assert (summary["model"], summary["classes"], summary["dtype"]) == ("classifier", len(NAMES), "fp32")
    names = {p.name for p in out.iterdir()}
    assert names == {"classifier.onnx", "classnames.txt", "preprocess.json", "manifest.json"}
    assert (out / "classnames.txt").read_text() == "".join(f"{n}\n" for n in NAMES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["model"] == "classifier" and manifest["classes"] == 5
    assert {"source", "dtype", "quantization", "opset", "graph", "check", "files"} <= set(manifest)
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["check"]["logits_cosine_min"] >= 0.9999 and manifest["check"]["top1_agreement"] == 1.0
    assert "Split" not in manifest["graph"]["ops"]["classifier"]  # the attention rewrite applied
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["model"] == "classifier" and pre["classes"] == 5
    assert {k: pre[k] for k in image_preprocess(cfg)} == image_preprocess(cfg)  # the CLIP export's image side
    graph = onnx.load(str(out / "classifier.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic, not traced
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == len(NAMES)


def test_fp32_logits_and_predictions_match_the_classifier_model(classifier, fp32, tmp_path):
    _, model, cfg = classifier
    clf = OnnxClassifier(fp32[0], providers=["CPUExecutionProvider"])
    assert clf.classnames == NAMES
    for n in (1, 2, 7):
        x = _images(cfg, n, seed=n)
        want = model.logits(x).detach().numpy()
        np.testing.assert_allclose(clf.logits(x.numpy()), want, atol=1e-4, rtol=1e-4)
    # PIL images, 32 x 32: the centre crop is the identity, so the eager model sees the same pixels
    pixels = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    probs = model.logits(x).detach().softmax(dim=1).numpy()
    pred = clf.predict([Image.fromarray(p) for p in pixels])
    assert pred.indices.tolist() == probs.argmax(1).tolist()
    assert pred.names == [NAMES[i] for i in probs.argmax(1)]
    assert len(set(pred.names)) > 1  # the head really separates these images
    np.testing.assert_allclose(pred.probabilities, probs, atol=1e-5)
    np.testing.assert_allclose(pred.scores, probs.max(1), atol=1e-5)


@pytest.mark.parametrize("dtype, weight_type, min_cos", [
    ("fp16", onnx.TensorProto.FLOAT16, 0.999),
    ("int8", onnx.TensorProto.INT8, 0.98),
])
def test_fp16_and_int8_convert_and_keep_the_classes(classifier, tmp_path, dtype, weight_type, min_cos):
    src, model, cfg = classifier
    out = tmp_path / dtype
    summary = convert(src, out, "onnx", dtype)
    assert summary["dtype"] == dtype and summary["model"] == "classifier"
    assert summary["quantization"] == ("dynamic" if dtype == "int8" else None)
    assert weight_type in {t.data_type for t in onnx.load(str(out / "classifier.onnx")).graph.initializer}
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["logits_cosine_min"] > min_cos and 0.0 <= check["top1_agreement"] <= 1.0
    clf = OnnxClassifier(out, providers=["CPUExecutionProvider"])
    x = _images(cfg, 16, seed=3)
    got, want = clf.logits(x.numpy()), model.logits(x).detach().numpy()
    assert got.dtype == np.float32 and got.shape == (16, len(NAMES))  # fp32 in and out at every dtype
    assert _cos(got, want).min() > min_cos
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.8


def test_static_int8_calibrates_on_images(classifier, shards, tmp_path, capsys):
    src, model, cfg = classifier
    out = tmp_path / "static"
    assert main(["convert", str(src), str(out), "--to", "onnx", "--dtype", "int8", "--quant", "static"]) == 2
    assert "needs calibration data: pass --calibration" in capsys.readouterr().err
    assert not out.exists()
    summary = convert(src, out, "onnx", "int8", quant="static", calibration=shards["val"],
                      calibration_samples=32)
    assert summary["quantization"] == "static" and summary["model"] == "classifier"
    ops = {n.op_type for n in onnx.load(str(out / "classifier.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations quantised with calibrated ranges
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 32 and manifest["check"]["logits_cosine_min"] > 0.95


def test_transformers_optimizer_fuses_the_image_tower(classifier, tmp_path):
    src, model, cfg = classifier
    out = tmp_path / "fused"
    convert(src, out, "onnx", "fp32", optimizer="transformers")  # passes the fp32 check: still the model
    graph = json.loads((out / "manifest.json").read_text())["graph"]
    assert "vit: the image tower" in graph["optimizer"]
    assert graph["fused_operators"]["image"].get("Attention")
    assert graph["ops"]["classifier"].get("Attention") == graph["fused_operators"]["image"]["Attention"]


def test_clip_and_classifier_runtimes_refuse_each_others_folder(fp32, tiny_tok, tmp_path):
    with pytest.raises(ValueError, match="fine-tuned classifier's ONNX export.*open it with OnnxClassifier"):
        OnnxCLIP(fp32[0], providers=["CPUExecutionProvider"])
    clip = tmp_path / "clip"
    convert(write_tiny_weights(tmp_path / "w", tiny_tok), clip, "onnx")
    assert "model" not in json.loads((clip / "manifest.json").read_text())  # CLIP's keys unchanged
    with pytest.raises(ValueError, match="is a CLIP export.*open it with OnnxCLIP"):
        OnnxClassifier(clip)


def test_classnames_that_do_not_match_the_graph_are_refused(fp32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32[0], copy)
    (copy / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="holds 2 class names but classifier.onnx outputs 5 logits"):
        OnnxClassifier(copy, providers=["CPUExecutionProvider"])


def test_bad_combinations_are_refused_and_leave_nothing(classifier, tmp_path, capsys):
    src, model, cfg = classifier
    assert main(["convert", str(src), str(tmp_path / "a"), "--to", "onnx", "--dtype", "bf16"]) == 2
    assert "choose one of fp32, fp16, int8" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "b"), "--to", "onnx", "--calibration", "x.tar"]) == 2
    assert "apply to --dtype int8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--optimizer 'fast': choose one of none, transformers"):
        convert(src, tmp_path / "c", "onnx", optimizer="fast")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="3 class names for a head of 5 classes"):
        export_classifier_onnx(model, NAMES[:3], cfg, tmp_path / "x")
    with pytest.raises(ValueError, match="holds a line break"):
        export_classifier_onnx(model, [*NAMES[:4], "two\nlines"], cfg, tmp_path / "x")


def test_predicts_in_a_process_without_torch(classifier, fp32, tmp_path):
    _, model, cfg = classifier
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    want = model.logits(x).detach().argmax(1).tolist()
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import importlib.util, json, sys
        from PIL import Image
        spec = importlib.util.spec_from_file_location("onnx_runtime", {str(RUNTIME)!r})
        rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
        clf = rt.OnnxClassifier({str(fp32[0])!r}, providers=["CPUExecutionProvider"])
        pred = clf.predict([Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(4)])
        out = {{"idx": pred.indices.tolist(), "names": pred.names, "torch": "torch" in sys.modules}}
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[0])
    assert result == {"idx": want, "names": [NAMES[i] for i in want], "torch": False}
