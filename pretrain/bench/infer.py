"""`pretrain bench infer`: inference speed and kept accuracy per backend and dtype, against eager fp32.

    pretrain bench infer --checkpoint RUN_DIR --data 'val/shard-{000000..000001}.tar' \\
        --classnames val/classnames.txt --json                       # a trained run: speed + accuracy
    pretrain bench infer --json model.image_size=224 ...              # random init at any shapes: speed only

Variants (`--variants`): `torch:fp32` (eager, the reference), `compile:fp32` (torch.compile of each tower,
inductor; needs a C++ compiler on CPU, reported as skipped without one), `onnx:fp32`, `onnx:fp16`,
`onnx:int8` (dynamic quantisation) and `onnx:int8-static` (calibrated on the first `--calibration-samples`
of `--data`); on request also `onnx:fp32-fused`, `onnx:fp16-fused`, `onnx:int8-fused` (the same exports
with `--optimizer transformers`: onnxruntime.transformers' fused Attention/SkipLayerNorm/BiasGelu). Every
variant uses all cores (torch's and onnxruntime's default thread pools), one at a time.

Speed: images/s and texts/s at the throughput batch (`--batch`), and p50/p99 latency of single inputs
(batch 1) and of throughput batches, on fixed random inputs (speed does not depend on pixel values).
Accuracy, with `--data`: cosine of each variant's image and text embeddings to eager fp32's on the held-out
samples (mean and min), and zero-shot top-1 with each variant's own text encoder building the classifier
from the same prompts (`pretrain.evaluation.features.classifier_weights`); the eager fp32 row is also
checked against `pretrain.evaluation.evaluate.evaluate` on the same data (`zeroshot_top1_evaluate`). The
prompts are the ones `pretrain eval` uses: `--templates`, else zeroshot_classification_templates.txt beside
the shards (or one folder up), else the built-in ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

VARIANTS = ("torch:fp32", "compile:fp32", "onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:int8-static")
"""What runs by default."""
FUSED_VARIANTS = ("onnx:fp32-fused", "onnx:fp16-fused", "onnx:int8-fused")
"""Only when asked (`--variants`): the export with onnxruntime.transformers' optimizer (for GPU providers)."""


def _random_weights(out: Path, overrides: list[str]) -> Path:
    from data_pipelines.synth import write_synthetic_shards
    from data_pipelines.tokenizer import train_tokenizer_from_shards
    from pretrain.checkpoint.sources import DictSource
    from pretrain.checkpoint.universal import write_weights
    from pretrain.config import embedded_config_path, load_config, to_dict
    from pretrain.models.pretrain_model import PretrainModel

    cfg = load_config(embedded_config_path(), overrides)
    val = write_synthetic_shards(out / "captions", samples=200, samples_per_shard=200, image_size=32, seed=1)
    tok = train_tokenizer_from_shards(val["urls"], cfg.data.vocab_size, 200)
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random init"), out / "weights", overwrite=True)
    return out / "weights"


class _Compiled:
    """torch.compile of each tower (inductor, static shapes: one graph per batch size)."""

    def __init__(self, model: Any) -> None:
        self.visual = torch.compile(model.visual, dynamic=False)
        self.text = torch.compile(model.text, dynamic=False)
        self.device = torch.device("cpu")

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text(ids).float(), dim=-1)

    def parameters(self):  # noqa: ANN201 -- the CPU, for the shared loops
        yield torch.empty(0)


def _timings(fn: Callable[[], Any], iters: int) -> list[float]:
    fn()  # warm-up (first call: allocation, compilation, onnxruntime's arena)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _speed(enc: Any, images: torch.Tensor, ids: torch.Tensor, iters: int, latency_iters: int
           ) -> dict[str, float]:
    b = len(images)
    res: dict[str, float] = {}
    for kind, x, f in (("image", images, enc.encode_image), ("text", ids, enc.encode_text)):
        thr = _timings(lambda f=f, x=x: f(x), iters)
        one = _timings(lambda f=f, x=x: f(x[:1]), latency_iters)
        res[f"{kind}s_per_s"] = round(b * len(thr) / sum(thr), 2)
        res[f"{kind}_p50_ms_b1"], res[f"{kind}_p99_ms_b1"] = (round(float(np.percentile(one, q)) * 1e3, 3)
                                                              for q in (50, 99))
        res[f"{kind}_p50_ms_b{b}"], res[f"{kind}_p99_ms_b{b}"] = (round(float(np.percentile(thr, q)) * 1e3, 2)
                                                                  for q in (50, 99))
    return res


def _held_out(tok: Any, cfg: Any, data: str, max_samples: int) -> dict[str, torch.Tensor]:
    from data_pipelines.loader import make_eval_loader

    loader = make_eval_loader(data, tok, cfg.model.image_size, 64, cfg.model.text.context_length,
                              cfg.data.mean, cfg.data.std, max_sample_bytes=cfg.data.max_sample_bytes,
                              max_samples=max_samples)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in ("image", "text", "cls")}


def bench_templates(data: str, templates: str | None = None) -> tuple[str, ...]:
    """The zero-shot prompts for `data`: `templates` when given, else the templates file beside the first
    shard (or one folder up), else the built-in ones -- `pretrain eval`'s lookup
    (`pretrain.evaluation.layout.find_templates`), so the accuracy here equals `pretrain eval`'s."""
    from data_pipelines.urls import expand_urls, split_sources
    from pretrain.evaluation.features import TEMPLATES
    from pretrain.evaluation.layout import find_templates

    prompts = find_templates(expand_urls(split_sources(data)[0])[0], templates)[1]
    return tuple(prompts) if prompts else TEMPLATES


def _accuracy(enc: Any, held: dict[str, torch.Tensor], tok: Any, cfg: Any, classnames: list[str] | None,
              templates: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Embeddings of the held-out samples and, with `classnames`, zero-shot top-1 with `templates` (None:
    the built-in prompts; `run_infer_bench` passes `bench_templates`, what `pretrain eval` uses)."""
    from pretrain.evaluation.features import TEMPLATES, classifier_weights

    img = torch.cat([enc.encode_image(x) for x in held["image"].split(64)]).float()
    txt = torch.cat([enc.encode_text(x) for x in held["text"].split(64)]).float()
    out: dict[str, Any] = {"image": img, "text": txt}
    if classnames:
        w = classifier_weights(enc, tok, classnames, cfg.model.text.context_length,
                               templates or TEMPLATES).float()
        has = held["cls"] >= 0
        pred = (img[has] @ w.T).argmax(dim=1)
        out["zeroshot_top1"] = round(float((pred == held["cls"][has]).float().mean()), 4)
    return out


def _variant(name: str, model: Any, tok: Any, cfg: Any, src: Path, out: Path, calibration: str | None,
             calib_samples: int) -> tuple[Any, dict[str, Any]]:
    from pretrain.evaluation.encoders import OnnxEncoder, TorchEncoder

    backend, dtype = name.split(":")
    if backend == "torch":
        return TorchEncoder(model), {}
    if backend == "compile":
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            raise RuntimeError("torch.compile on CPU needs a C++ compiler (g++), not found")
        return _Compiled(model), {}
    from pretrain.export.onnx_convert import convert_onnx

    quant = "static" if dtype == "int8-static" else "dynamic"
    if quant == "static" and not calibration:
        raise RuntimeError("onnx:int8-static needs --data for calibration")
    folder = out / f"onnx-{dtype}"
    t = time.perf_counter()
    calib = calibration if quant == "static" else None
    optimizer = "transformers" if dtype.endswith("-fused") else "none"
    summary = convert_onnx(src, folder, dtype.split("-")[0], quant, calib, calib_samples, overwrite=True,
                           optimizer=optimizer)
    return OnnxEncoder(folder), {"export_s": round(time.perf_counter() - t, 2), "bytes": summary["bytes"]}


def run_infer_bench(out: Path, checkpoint: str | None, data: str | None, classnames: str | None,
                    variants: list[str], batch: int, iters: int, latency_iters: int, max_samples: int,
                    calib_samples: int, overrides: list[str], templates: str | None = None) -> dict[str, Any]:
    """The benchmark's result (see the module docstring). Zero-shot prompts: `templates` (a file), else the
    templates file beside `data`'s shards, else the built-in ones, as `pretrain eval` picks them."""
    from pretrain.evaluation.evaluate import evaluate, load_model, read_classnames

    bad = [v for v in variants if v not in VARIANTS + FUSED_VARIANTS]
    if bad:
        raise ValueError(f"--variants {bad}: choose from {', '.join(VARIANTS + FUSED_VARIANTS)}")
    if checkpoint and overrides:
        raise ValueError("config overrides apply to the random-init model; a --checkpoint brings its own")
    out.mkdir(parents=True, exist_ok=True)
    src = Path(checkpoint) if checkpoint else _random_weights(out, overrides)
    model, tok, cfg = load_model(src)
    S, L = cfg.model.image_size, cfg.model.text.context_length
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, S, S, generator=g)
    ids = tok.encode_batch([f"a {c} {s} on the {p}" for c, s, p in zip(
        ["red", "blue", "green", "small"] * batch, ["square", "circle"] * batch,
        ["left", "right", "top"] * batch, strict=False)][:batch], L)
    names = read_classnames(classnames) if classnames else None
    held = _held_out(tok, cfg, data, max_samples) if data else None
    prompts = bench_templates(data, templates) if data and names else None
    m = cfg.model
    shapes = {"image_size": S, "patch_size": m.vision.patch_size, "vision_width": m.vision.width,
              "vision_layers": m.vision.layers, "text_width": m.text.width, "text_layers": m.text.layers,
              "context_length": L, "embed_dim": m.embed_dim}
    result: dict[str, Any] = {"model": shapes,
                              "checkpoint": str(checkpoint or "random init"), "batch": batch, "iters": iters,
                              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                              "load_avg": list(os.getloadavg()), "variants": {}}
    ref: dict[str, Any] | None = None
    for name in ["torch:fp32", *[v for v in variants if v != "torch:fp32"]]:
        row: dict[str, Any] = {}
        try:
            enc, row = _variant(name, model, tok, cfg, src, out, data, calib_samples)
            t = time.perf_counter()
            row.update(_speed(enc, images, ids, iters, latency_iters))
            if held is not None:
                acc = _accuracy(enc, held, tok, cfg, names, prompts)
                if ref is None:
                    ref = {k: acc[k] for k in ("image", "text")}
                for k in ("image", "text"):
                    cos = (acc.pop(k) * ref[k]).sum(1)
                    row[f"{k}_cosine_mean"] = round(float(cos.mean()), 6)
                    row[f"{k}_cosine_min"] = round(float(cos.min()), 6)
                row.update(acc)
            row["seconds"] = round(time.perf_counter() - t, 1)
        except RuntimeError as e:
            row = {"skipped": str(e)}
        result["variants"][name] = row
    base = result["variants"]["torch:fp32"]
    for row in result["variants"].values():
        if "images_per_s" in row:
            row["images_per_s_vs_eager"] = round(row["images_per_s"] / base["images_per_s"], 3)
            row["texts_per_s_vs_eager"] = round(row["texts_per_s"] / base["texts_per_s"], 3)
            if "zeroshot_top1" in row:
                row["zeroshot_delta_points"] = round(100 * (row["zeroshot_top1"] - base["zeroshot_top1"]), 2)
    if data and classnames:
        ev = evaluate(src, data, classnames, max_samples=max_samples, model_bundle=(model, tok, cfg),
                      templates=list(prompts) if prompts else None)
        result["zeroshot_top1_evaluate"] = ev["zeroshot_top1"]
    return result


def add_infer_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("infer", help="inference images/s, texts/s, latency and kept accuracy per backend "
                         "and dtype vs eager fp32", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="run dir / checkpoint (default: random init at the given shapes)")
    p.add_argument("--data", help="held-out shard URLs: cosine to fp32, zero-shot, int8 calibration")
    p.add_argument("--classnames", help="classnames.txt for zero-shot top-1")
    p.add_argument("--templates", metavar="FILE", help="zero-shot prompt templates, one per line with {c} or "
                   "{} (default: zeroshot_classification_templates.txt beside the shards, else built-in; "
                   "as pretrain eval)")
    p.add_argument("--out", default="runs/bench-infer", help="folder for exports and random weights")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + FUSED_VARIANTS)
    p.add_argument("--batch", type=int, default=64, help="throughput batch")
    p.add_argument("--iters", type=int, default=10, help="timed throughput batches per variant")
    p.add_argument("--latency-iters", type=int, default=50, help="timed batch-1 calls per variant")
    p.add_argument("--max-samples", type=int, default=1000, help="held-out samples for accuracy")
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides (random init)")
    p.set_defaults(func=cmd_infer_bench)


def cmd_infer_bench(args: argparse.Namespace) -> int:
    result = run_infer_bench(Path(args.out), args.checkpoint, args.data, args.classnames, args.variants,
                             args.batch, args.iters, args.latency_iters, args.max_samples,
                             args.calibration_samples, args.overrides, templates=args.templates)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for name, r in result["variants"].items():
            if "skipped" in r:
                print(f"{name:<18} skipped: {r['skipped']}")
                continue
            acc = f", zero-shot {r['zeroshot_top1']}" if "zeroshot_top1" in r else ""
            print(f"{name:<18} {r['images_per_s']:9.1f} images/s (x{r['images_per_s_vs_eager']}), "
                  f"{r['texts_per_s']:9.1f} texts/s (x{r['texts_per_s_vs_eager']}){acc}")
    return 0
