"""`pretrain convert SRC DST --to onnx`: load any checkpoint, read calibration data, write a staged folder.

Argument problems (dtype, quantisation mode, static int8 without calibration shards, DST exists) fail
before the checkpoint is read; the export is written into a temporary sibling of DST and renamed into
place with its manifest only when both graphs passed their check, so a failure leaves nothing behind.

A fine-tuned classifier (`train.task=classify`, told from the checkpoint's config before any weights are
read) goes to `pretrain.export.onnx_classifier` instead: one `classifier.onnx` with its class names, through
the same staging, options, calibration loader and manifest; its summary adds `model` and `classes`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.checkpoint.tensor_files import staged_output, write_manifest
from pretrain.export.onnx import ONNX_DTYPES, OPTIMIZERS, export_onnx
from pretrain.export.onnx_quant import QUANT_MODES

__all__ = ["calibration_batches", "check_args", "convert_onnx"]


def check_args(dst: Path, dtype: str, quant: str, calibration: str | None, samples: int,
               overwrite: bool, optimizer: str = "none") -> None:
    """Every argument problem that needs no model."""
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"--dtype {dtype!r} for --to onnx: choose one of {', '.join(ONNX_DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if quant not in QUANT_MODES:
        raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if dtype != "int8" and (quant != "dynamic" or calibration):
        raise ValueError(f"--quant / --calibration apply to --dtype int8, not {dtype}")
    if dtype == "int8" and quant == "static" and not calibration:
        raise ValueError("--dtype int8 --quant static needs calibration data: pass --calibration SHARDS "
                         "(a few hundred images are enough), or use --quant dynamic (no data needed)")
    if samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {samples}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; choose a new output path (or pass --overwrite)")


def calibration_batches(urls: str, tokenizer: Any, cfg: Any, samples: int, batch_size: int = 32,
                        captions: bool = True) -> dict[str, list[np.ndarray]]:
    """The first `samples` readable samples of `urls` through the eval loader (centre crop, as inference
    sees them): normalised image batches and caption id batches. ValueError when none is readable.
    `captions=False` (a classifier's graph, which calibrates on images only): samples need no caption, so
    labelled image sets without `.txt` (image + `.cls`) calibrate too; their "text" batches are empty
    captions."""
    from data_pipelines.loader import make_eval_loader

    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size,
                              cfg.model.text.context_length, cfg.data.mean, cfg.data.std,
                              max_sample_bytes=cfg.data.max_sample_bytes, max_samples=samples,
                              captions=captions)
    out: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for batch in loader:
        out["image"].append(batch["image"].numpy())
        out["text"].append(batch["text"].numpy())
    if not out["image"]:
        raise ValueError(f"--calibration {urls}: no readable sample to calibrate on")
    return out


def convert_onnx(src: str | Path, dst: Path, dtype: str = "fp32", quant: str = "dynamic",
                 calibration: str | None = None, samples: int = 256, overwrite: bool = False,
                 optimizer: str = "none") -> dict[str, Any]:
    """Export SRC's encoders (or a classifier's graph) to DST; returns the summary `pretrain convert`
    prints."""
    dst = Path(dst)
    check_args(dst, dtype, quant, calibration, samples, overwrite, optimizer)
    if not Path(src).exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    from pretrain.evaluation.classifier_eval import CLASSIFY_TASK, checkpoint_task
    from pretrain.evaluation.evaluate import load_model

    t0 = time.perf_counter()
    is_classifier = checkpoint_task(src) == CLASSIFY_TASK
    if is_classifier:
        from pretrain.export.onnx_classifier import classifier_export

        export, tokenizer, cfg = classifier_export(src)
    else:
        model, tokenizer, cfg = load_model(src)

        def export(out: Path, *args: Any) -> dict[str, Any]:
            return export_onnx(model, tokenizer, cfg, out, *args)
    calib = None
    if dtype == "int8" and quant == "static":
        def calib() -> dict[str, list[np.ndarray]]:
            return calibration_batches(calibration, tokenizer, cfg, samples, captions=not is_classifier)
    with staged_output(dst, overwrite) as tmp:
        info = export(tmp, dtype, quant, calib, optimizer)
        if calibration and quant == "static":
            info["calibration"] = {"urls": calibration, "samples": samples}
        write_manifest(tmp, {}, kind="onnx", source=str(src), **info)
        files = json.loads((tmp / "manifest.json").read_text())["files"]
    classifier = {k: info[k] for k in ("model", "classes") if k in info}  # absent for CLIP encoders
    return {"to": "onnx", "out": str(dst), **classifier, "dtype": dtype, "quantization": info["quantization"],
            "optimizer": optimizer, "check": info["check"], "bytes": sum(e["bytes"] for e in files.values()),
            "seconds": round(time.perf_counter() - t0, 2)}
