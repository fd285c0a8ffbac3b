"""`pretrain convert SRC DST --to onnx [--dtype fp32|fp16|int8]`: the two CLIP encoders as ONNX graphs.

DST holds `image.onnx` (pixel_values float32 [batch, 3, S, S] -> embeds [batch, E]), `text.onnx`
(input_ids int64 [batch, L] -> embeds [batch, E]), both with a dynamic batch axis and L2-normalised
outputs (the model's own `encode_image` / `encode_text`), the run's tokenizer as the `tokenizers` library's
`tokenizer.json` (OpenAI CLIP's too, for `data.tokenizer=clip`),
`preprocess.json` (what `pretrain.export.onnx_runtime.OnnxCLIP` needs to turn images and strings into
those inputs) and `manifest.json`. Inputs and outputs stay float32 at every dtype, so callers never
change.

Graphs come from torch's TorchScript-based exporter (opset 17): on this torch it writes a working
dynamic-batch graph in ~1 s where the dynamo exporter takes several times longer for the same ops. The
towers are traced with their attention rewritten into the form onnxruntime's fusions match
(`pretrain.export.onnx_fuse`: separate q/k/v projections; 1.1-1.2x faster int8 on CPU at the demo's
shapes); `optimizer="transformers"` also runs onnxruntime.transformers' fusing optimizer before any
quantisation. The manifest's `graph` records the optimizer and the op counts of each file and of the
graph onnxruntime's CPU session runs after its own load-time fusions. fp16
is onnxruntime's float16 conversion (fp32 inputs/outputs kept, LayerNorm and normalisation kept in fp32),
int8 onnxruntime's quantisation (`pretrain.export.onnx_quant`). Each graph is checked after writing: run
in onnxruntime at two batch sizes against the eager model, the cosines recorded in the manifest; an fp32
graph below cosine 0.9999 fails the conversion.

A fine-tuned classifier's checkpoint is written by `pretrain.export.onnx_classifier` through the same
helpers (`export_tower`, `write_graphs`, `check_options`, `image_preprocess`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.tokenizer import EOS_ID, PAD_ID, SOS_ID, TextTokenizer
from pretrain.config import Config
from pretrain.export.common import write_json
from pretrain.export.onnx_fuse import OPTIMIZERS, fusable_tower, graph_record, transformers_optimize
from pretrain.export.onnx_runtime import IMAGE_ONNX, PREPROCESS, TEXT_ONNX, TOKENIZER, OnnxCLIP

__all__ = ["ONNX_DTYPES", "OPSET", "OPTIMIZERS", "ExportError", "check_options", "example_images",
           "export_onnx", "export_tower", "image_preprocess", "preprocess_config", "runtime_tokenizer_json",
           "write_graphs"]

ONNX_DTYPES = ("fp32", "fp16", "int8")
OPSET = 17
"""Not 18: see `pretrain.export.onnx_fuse` (the transformer optimizer cannot shape opset 18's ReduceL2)."""
FP32_MIN_COSINE = 0.9999
"""An fp32 graph must reproduce the eager embeddings this closely, or the export is broken."""


class ExportError(ValueError):
    """A tower that cannot be exported; the message names the layer."""


class _ImageEncoder(nn.Module):
    """`PretrainModel.encode_image` as a module (what is traced): tower, then L2 normalisation."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values).float(), dim=-1)


class _TextEncoder(nn.Module):
    """`PretrainModel.encode_text` as a module: causal pass pooled as the tower pools (the first [EOS] of
    our BPE, or argmax over the ids with OpenAI CLIP's tokenizer), L2-normalised."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids, causal=True).float(), dim=-1)


def _is_clip_tokenizer(tokenizer: Any) -> bool:
    return getattr(tokenizer, "pool_type", "eos") == "argmax"


def runtime_tokenizer_json(tokenizer: Any) -> str:
    """The `tokenizers` library's JSON of the run's tokenizer, what `OnnxCLIP` loads as tokenizer.json.

    Our BPE's record is that JSON already. OpenAI CLIP's (`data.tokenizer=clip`) is stored in checkpoints
    as a small record naming its merges file; the export writes the Rust tokenizer it builds from them
    (CLIP's vocabulary, merges, pre-tokenizer regex and special tokens), so the folder needs no open_clip.
    CLIP's text clean-up runs in Python before it (`preprocess.json` `text_clean`)."""
    if _is_clip_tokenizer(tokenizer):
        return tokenizer.runtime_json()
    return tokenizer.to_json()


def image_preprocess(cfg: Config) -> dict[str, Any]:
    """The image half of `preprocess.json` (what turns an image file into `pixel_values`), shared by the
    CLIP and the classifier export so both folders preprocess exactly as eval does."""
    return {"image_size": cfg.model.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "resize": "shorter side to image_size, bicubic", "crop": "center", "channels": "RGB",
            "scale": "pixels / 255, then (x - mean) / std"}


def preprocess_config(cfg: Config, dtype: str, quant: str | None, tokenizer: Any = None) -> dict[str, Any]:
    """What turns an image file or a string into the graphs' inputs (read by `OnnxCLIP`): the special ids,
    clean-up and pooling are the run's tokenizer's (default: our BPE's)."""
    if tokenizer is not None and _is_clip_tokenizer(tokenizer):
        ids = {"sos_id": tokenizer.sos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        clean, layout = "clip", "<start_of_text> tokens[:context_length - 2] <end_of_text> 0..."
        text_pool = ("highest id in the row (argmax; the first <end_of_text>) after ln_final, @ "
                     "text_projection (causal attention)")
    else:
        ids = {"sos_id": SOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}
        clean, layout = "none", "[SOS] tokens[:context_length - 2] [EOS] [PAD]..."
        text_pool = "first EOS token after ln_final, @ text_projection (causal attention)"
    return {
        **image_preprocess(cfg),
        "context_length": cfg.model.text.context_length, **ids, "text_layout": layout,
        "text_clean": clean,
        "pooling": {"image": "class token after ln_post, @ proj", "text": text_pool},
        "normalized": True, "embed_dim": cfg.model.embed_dim, "dtype": dtype, "quantization": quant,
        "inputs": {"image": "pixel_values float32 [batch, 3, S, S]", "text": "input_ids int64 [batch, L]"},
        "outputs": "embeds float32 [batch, E]",
    }


# ------------------------------------------------------------------------------------------ export
def _export(module: nn.Module, example: torch.Tensor, name: str, out: Path | io.BytesIO,
            output: str = "embeds") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the batch axis is checked below
        torch.onnx.export(module, (example,), out, input_names=[name], output_names=[output],
                          dynamic_axes={name: {0: "batch"}, output: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)


class _Bound(nn.Module):
    """A submodule with its non-tensor arguments (flags, None masks) fixed, so it can be exported alone."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        super().__init__()
        self.module, self.args = module, args
        self.tensors = tuple(a for a in args if isinstance(a, torch.Tensor))

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        return self.module(*(next(it) if isinstance(a, torch.Tensor) else a for a in self.args))


def _failing_layer(module: nn.Module, example: torch.Tensor) -> str | None:
    """Name the innermost submodule that cannot be exported on its own (with the inputs it got in a real
    forward), so the error points at a layer instead of a traceback from inside the exporter."""
    captured: dict[str, tuple[Any, ...]] = {}
    names = {m: n for n, m in module.named_modules() if n}
    hooks = [m.register_forward_pre_hook(lambda m, args: captured.setdefault(names[m], args))
             for m in names]
    try:
        with torch.no_grad():
            module(example)
    except Exception:  # noqa: BLE001 -- the failing module is the last one entered
        return list(captured)[-1] if captured else None
    finally:
        for h in hooks:
            h.remove()
    failing = []
    for name, args in captured.items():  # execution order; children after their parent
        sub = _Bound(dict(module.named_modules())[name], args)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(sub, sub.tensors, io.BytesIO(), opset_version=OPSET, dynamo=False)
        except Exception:  # noqa: BLE001 -- any exporter failure marks the layer
            failing.append(name)
    inner = [n for n in failing if not any(o.startswith(n + ".") for o in failing)]
    return inner[0] if inner else None


def export_tower(module: nn.Module, example: torch.Tensor, name: str, path: Path, tower: str,
                 output: str = "embeds", what: str | None = None) -> None:
    """Trace `module` (input `name`, output `output`, dynamic batch) to `path`; an exporter failure is an
    ExportError naming `what` (default: the `tower` encoder) and the innermost layer that fails alone."""
    try:
        _export(module, example, name, path, output)
    except Exception as e:  # noqa: BLE001 -- any exporter error is reported with the layer it came from
        layer = _failing_layer(module, example)
        where = f"layer {layer!r} ({type(dict(module.named_modules())[layer]).__name__})" if layer else \
            "an unidentified layer"
        what = what or f"{tower} encoder"
        raise ExportError(f"the {what} cannot be exported to ONNX (opset {OPSET}): {where} fails: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def check_export(folder: Path, model: Any, images: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Min cosine of the ONNX embeddings to the eager model's at the given batches (two sizes: the batch
    axis must be dynamic)."""
    clip = OnnxCLIP(folder, providers=["CPUExecutionProvider"])
    out = {}
    with torch.no_grad():
        for tower, x, run, ref in (("image", images, clip.encode_pixels, model.encode_image),
                                   ("text", ids, clip.encode_ids, model.encode_text)):
            worst = 1.0
            for b in (1, len(x)):
                worst = min(worst, _cosines(run(x[:b].numpy()), ref(x[:b]).float().numpy()))
            out[f"{tower}_cosine_min"] = round(worst, 7)
    return out


def example_images(cfg: Config, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Random normalised-range images [batch, 3, S, S] (traced, then the post-write check's inputs)."""
    S = cfg.model.image_size
    return torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(seed))


def example_inputs(cfg: Config, tokenizer: TextTokenizer, batch: int = 3, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised-range images and real captions of different lengths (EOS at different places)."""
    images = example_images(cfg, batch, seed)
    words = ["a", "red", "small", "square", "on", "the", "left", "blue", "circle", "large"]
    texts = [" ".join(words[: 1 + (i * 3) % len(words)]) for i in range(batch)]
    return images, tokenizer.encode_batch(texts, cfg.model.text.context_length)


def check_options(dtype: str, quant: str, calibration: Callable[[], Any] | None, optimizer: str) -> None:
    """ValueError for a dtype / quantisation / optimizer combination no export can write."""
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"--dtype {dtype!r} for --to onnx: choose one of {', '.join(ONNX_DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    from pretrain.export.onnx_quant import QUANT_MODES

    if dtype == "int8" and quant not in QUANT_MODES:
        raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if dtype == "int8" and quant == "static" and calibration is None:
        raise ValueError("--dtype int8 --quant static needs calibration data: pass --calibration SHARDS "
                         "(a few hundred images are enough), or use --quant dynamic")


def write_graphs(fp32: Path, out: Path, graphs: Sequence[tuple[str, str, Any]], dtype: str, quant: str,
                 calibration: Callable[[], dict[str, list[np.ndarray]]] | None, optimizer: str
                 ) -> dict[str, dict[str, int]]:
    """Turn the traced fp32 graphs in `fp32` into `out`'s files at `dtype`, then remove `fp32`.

    `graphs`: (file name, tower "image" or "text", its tower config: heads, width). With
    `optimizer="transformers"` each is fused first (returned: the fused-op statistics per tower); int8
    static calibrates on `calibration()[tower]`. One path for every export, so CLIP encoders and a
    classifier get the same conversions."""
    from pretrain.export.onnx_quant import quantize, to_fp16

    fused: dict[str, dict[str, int]] = {}
    for name, tower, m in graphs:
        src = fp32 / name
        if optimizer == "transformers":
            fused[tower] = transformers_optimize(src, fp32 / f"fused-{name}", tower, m.heads, m.width)
            src = fp32 / f"fused-{name}"
        if dtype == "fp32":
            src.replace(out / name)
        elif dtype == "fp16":
            to_fp16(src, out / name)
        else:
            batches = calibration()[tower] if quant == "static" else None
            quantize(src, out / name, quant, batches, "pixel_values" if tower == "image" else "input_ids")
    for p in fp32.iterdir():
        p.unlink()
    fp32.rmdir()
    return fused


def export_onnx(model: Any, tokenizer: TextTokenizer, cfg: Config, out: Path, dtype: str = "fp32",
                quant: str = "dynamic", calibration: Callable[[], dict[str, list[np.ndarray]]] | None = None,
                optimizer: str = "none") -> dict[str, Any]:
    """Write both encoders of `model` (eval mode, fp32, CPU) into `out` (an existing, empty staged folder)
    at `dtype`; returns what the manifest records (dtype, quantisation, opset, graph, check cosines).

    `calibration()` returns {"image": [normalised image batches], "text": [id batches]} for static int8.
    `optimizer`: "none" or "transformers" (onnxruntime.transformers' fusions, before quantisation).
    """
    check_options(dtype, quant, calibration, optimizer)
    model = model.float().eval().cpu()
    images, ids = example_inputs(cfg, tokenizer)
    fp32 = out / "fp32"
    fp32.mkdir()
    export_tower(_ImageEncoder(fusable_tower(model.visual)).eval(), images, "pixel_values",
                 fp32 / IMAGE_ONNX, "image")
    export_tower(_TextEncoder(fusable_tower(model.text)).eval(), ids, "input_ids", fp32 / TEXT_ONNX, "text")
    towers = ((IMAGE_ONNX, "image", cfg.model.vision), (TEXT_ONNX, "text", cfg.model.text))
    fused = write_graphs(fp32, out, towers, dtype, quant, calibration, optimizer)
    graph = graph_record({"image": out / IMAGE_ONNX, "text": out / TEXT_ONNX}, fused or None)
    (out / TOKENIZER).write_text(runtime_tokenizer_json(tokenizer), encoding="utf-8")
    q = quant if dtype == "int8" else None
    write_json(out / PREPROCESS, preprocess_config(cfg, dtype, q, tokenizer))
    check = check_export(out, model, images, ids)
    if dtype == "fp32" and min(check.values()) < FP32_MIN_COSINE:
        raise ExportError(f"the fp32 ONNX graphs do not reproduce the eager model (cosines {check}, need "
                          f">= {FP32_MIN_COSINE}): an op was exported with different semantics")
    return {"dtype": dtype, "quantization": q, "opset": OPSET, "graph": graph, "check": check}
