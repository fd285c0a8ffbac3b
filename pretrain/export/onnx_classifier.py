"""`pretrain convert CLASSIFIER DST --to onnx`: a fine-tuned classifier (`train.task=classify`) as one graph.

DST holds `classifier.onnx` (pixel_values float32 [batch, 3, S, S] -> logits float32 [batch, C], dynamic
batch axis: `ClassifierModel.logits`, i.e. the image tower, L2 normalisation and the linear head),
`classnames.txt` (the checkpoint's class names, one per line: row i is logit i), `preprocess.json` (the
image half of the CLIP export's, `"model": "classifier"`, the class count) and `manifest.json` (kind onnx,
`"model": "classifier"`, the CLIP export's keys). `pretrain.export.onnx_runtime.OnnxClassifier` runs it.

Why it is the CLIP export's machinery and not a copy: the image tower is the same `VisionTower`, so the
same attention rewrite (`fusable_tower`), exporter call, fp16 / int8 conversions and optional
onnxruntime.transformers fusion (`write_graphs`) apply, and the same post-write check: the graph run in
onnxruntime at two batch sizes against the eager model, recording the worst logit cosine and the top-1
agreement with eager; an fp32 graph below cosine 0.9999 fails the conversion. Static int8 calibrates the
image tower on the same loader the CLIP export uses (the eval loader, centre crop), but its samples need
no caption (`calibration_batches(captions=False)`): labelled image sets without `.txt` (image + `.cls`, what
`pretrain eval` of a classifier reads) calibrate too; only its image batches are used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config
from pretrain.export.common import write_json
from pretrain.export.onnx import (
    FP32_MIN_COSINE,
    OPSET,
    ExportError,
    check_options,
    example_images,
    export_tower,
    image_preprocess,
    write_graphs,
)
from pretrain.export.onnx_fuse import fusable_tower, graph_record
from pretrain.export.onnx_runtime import (
    CLASSIFIER_MODEL,
    CLASSIFIER_ONNX,
    CLASSNAMES,
    PREPROCESS,
    OnnxClassifier,
)

__all__ = ["CHECK_IMAGES", "check_classifier", "classifier_export", "classifier_preprocess",
           "export_classifier_onnx"]

CHECK_IMAGES = 8
"""Random images traced and checked (at batch 1 and 8): enough rows for the top-1 agreement to mean
something, cheap at any tower size."""


class _Logits(nn.Module):
    """`ClassifierModel.logits` as a module (what is traced): tower, L2 normalisation, head."""

    def __init__(self, visual: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(pixel_values), dim=-1)).float()


def classifier_preprocess(cfg: Config, classes: int, dtype: str, quant: str | None) -> dict[str, Any]:
    """`preprocess.json` of a classifier export (read by `OnnxClassifier`): the CLIP export's image part."""
    return {
        "model": CLASSIFIER_MODEL, **image_preprocess(cfg),
        "pooling": {"image": "class token after ln_post, @ proj"},
        "head": "logits = head(L2-normalised image embedding) (linear, one row per class)",
        "classes": classes, "classnames": CLASSNAMES, "dtype": dtype, "quantization": quant,
        "inputs": {"image": "pixel_values float32 [batch, 3, S, S]"}, "outputs": "logits float32 [batch, C]",
    }


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair; two all-zero rows (a head still at its zero init) count as equal."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def check_classifier(folder: Path, model: Any, images: torch.Tensor) -> dict[str, float]:
    """Worst cosine of the ONNX logits to the eager model's and the fraction of images whose top-1 class
    agrees, at batch 1 and the whole batch (the batch axis must be dynamic)."""
    clf = OnnxClassifier(folder, providers=["CPUExecutionProvider"])
    worst, agree, rows = 1.0, 0, 0
    with torch.no_grad():
        for b in (1, len(images)):
            got, ref = clf.logits(images[:b].numpy()), model.logits(images[:b]).float().numpy()
            worst = min(worst, float(_row_cosines(got, ref).min()))
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            rows += b
    return {"logits_cosine_min": round(worst, 7), "top1_agreement": round(agree / rows, 4)}


def export_classifier_onnx(model: Any, classnames: list[str], cfg: Config, out: Path, dtype: str = "fp32",
                           quant: str = "dynamic",
                           calibration: Callable[[], dict[str, list[np.ndarray]]] | None = None,
                           optimizer: str = "none") -> dict[str, Any]:
    """Write the `ClassifierModel` `model` (eval, fp32, CPU) into `out` (an existing, empty staged folder) at
    `dtype`; returns what the manifest records (model, classes, dtype, quantisation, opset, graph, check).
    `calibration()` returns {"image": [normalised image batches], ...} for static int8."""
    check_options(dtype, quant, calibration, optimizer)
    if len(classnames) != model.num_classes:
        raise ValueError(f"{len(classnames)} class names for a head of {model.num_classes} classes")
    bad = [n for n in classnames if "\n" in n or "\r" in n]
    if bad:
        raise ValueError(f"class name {bad[0]!r} holds a line break: {CLASSNAMES} keeps one name per line")
    model = model.float().eval().cpu()
    images = example_images(cfg, CHECK_IMAGES)
    fp32 = out / "fp32"
    fp32.mkdir()
    export_tower(_Logits(fusable_tower(model.visual), model.head).eval(), images, "pixel_values",
                 fp32 / CLASSIFIER_ONNX, "image", output="logits", what="classifier (image tower + head)")
    fused = write_graphs(fp32, out, ((CLASSIFIER_ONNX, "image", cfg.model.vision),), dtype, quant,
                         calibration, optimizer)
    graph = graph_record({"classifier": out / CLASSIFIER_ONNX}, fused or None)
    if fused:
        graph["optimizer"] = "onnxruntime.transformers.optimizer.optimize_model (vit: the image tower)"
    (out / CLASSNAMES).write_text("".join(f"{n}\n" for n in classnames), encoding="utf-8")
    q = quant if dtype == "int8" else None
    write_json(out / PREPROCESS, classifier_preprocess(cfg, len(classnames), dtype, q))
    check = check_classifier(out, model, images)
    if dtype == "fp32" and check["logits_cosine_min"] < FP32_MIN_COSINE:
        raise ExportError(f"the fp32 ONNX classifier does not reproduce the eager model (check {check}, need "
                          f"logits cosine >= {FP32_MIN_COSINE}): an op was exported with different semantics")
    return {"model": CLASSIFIER_MODEL, "classes": len(classnames), "dtype": dtype, "quantization": q,
            "opset": OPSET, "graph": graph, "check": check}


def classifier_export(src_path: str | Path) -> tuple[Callable[..., dict[str, Any]], Any, Config]:
    """(export, tokenizer, config) of the classifier checkpoint at `src_path` (any kind `pretrain eval`
    reads): `export(out, dtype, quant, calibration, optimizer)` writes it as `export_classifier_onnx` does,
    with the class names the checkpoint records (its head's rows). The tokenizer is the run's, for the
    calibration loader."""
    from pretrain.checkpoint.sources import open_source
    from pretrain.evaluation.classifier_eval import load_classifier, saved_classnames

    src = open_source(src_path)
    names = saved_classnames(src)
    model, tokenizer, cfg = load_classifier(src)

    def export(out: Path, dtype: str, quant: str, calibration: Callable[[], Any] | None,
               optimizer: str) -> dict[str, Any]:
        return export_classifier_onnx(model, names, cfg, out, dtype, quant, calibration, optimizer)

    return export, tokenizer, cfg
