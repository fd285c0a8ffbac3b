"""`pretrain convert`: checkpoints between layouts and tools.

    pretrain convert SRC DST --to universal            any (dp, tp) ZeRO-3 checkpoint -> layout-free
    pretrain convert SRC DST --to safetensors [--dtype bf16]   consolidated weights + config + tokenizer
    pretrain convert SRC DST --to hf                   transformers.CLIPModel.from_pretrained(DST)
    pretrain convert SRC DST --to open_clip            open_clip model config + weights
    pretrain convert SRC DST --to onnx [--dtype fp32|fp16|int8] [--quant dynamic|static --calibration URLS]
                                  [--optimizer none|transformers]   image + text encoders for onnxruntime
                                                       (a fine-tuned classifier: image tower + head)
    pretrain convert --from hf|open_clip SRC DST       start pretraining from an existing CLIP model
    pretrain convert --from open_clip SRC DST --arch ViT-B-32   open_clip weights of a named architecture
    pretrain convert --from openai SRC DST             OpenAI's own format (state dict or TorchScript .pt)

SRC is a run directory, a DeepSpeed checkpoint folder, a universal checkpoint or a weights export. Every
output is written into a temporary folder and renamed into place when complete, carries a manifest
(sizes and sha256 of every file and tensor), and nothing is unpickled on the way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from parallel.memory import current_rss_mb, peak_rss_mb
from pretrain.checkpoint.sources import (
    DictSource,
    Source,
    check_output_path,
    load_tokenizer,
    open_source,
    refuse_classifier,
)
from pretrain.checkpoint.tensor_files import staged_output, write_manifest
from pretrain.checkpoint.universal import write_universal, write_weights
from pretrain.config import Config, dump_yaml, load_config, to_dict

log = logging.getLogger("mmpt.checkpoint")
TARGETS = ("universal", "safetensors", "hf", "open_clip", "onnx")
IMPORTS = ("hf", "open_clip", "openai")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONNX_DTYPES = ("fp32", "fp16", "int8")
"""--to onnx takes these instead of DTYPES (`pretrain.export.onnx`)."""


def _export_with(src: Source, dst: Path, to: str, dtype: torch.dtype, overwrite: bool) -> dict[str, Any]:
    """HF / open_clip exports: the library-specific writer fills a staged folder, we add the manifest."""
    if to == "hf":
        from pretrain.export.hf import export_hf as export
    else:
        from pretrain.export.open_clip import export_open_clip as export
    from pretrain.export.common import left_out_parts

    left_out = left_out_parts(src.names, to)
    if "fusion" in left_out:
        log.info("--to %s exports the dual encoder (CLIP towers + logit scale) only; left out: %s "
                 "(the cross-modal fusion encoder and its heads have no place in the %s model; "
                 "universal and safetensors outputs keep them)", to, ", ".join(left_out), to)
    # open_clip records the folder's name (`hf_tokenizer_name`): DST's, not the staging folder's
    named = {} if to == "hf" else {"name": Path(dst).resolve().name}
    with staged_output(dst, overwrite) as tmp:
        export(src.state_dict(), src.config, src.meta["tokenizer"], tmp, dtype=dtype, **named)
        write_manifest(tmp, {}, kind=to, step=src.meta.get("step"), left_out=left_out)
        nbytes = sum(e["bytes"] for e in json.loads((tmp / "manifest.json").read_text())["files"].values())
    return {"to": to, "out": str(dst), "params": len(src.names), "bytes": nbytes, "left_out": left_out}


def convert(src_path: str | Path, dst: str | Path, to: str, dtype: str = "fp32", overwrite: bool = False,
            quant: str = "dynamic", calibration: str | None = None, calibration_samples: int = 256,
            optimizer: str = "none") -> dict[str, Any]:
    """Convert one checkpoint; returns a summary (output path, tensors, bytes, seconds). `quant`,
    `calibration` (shard URLs) and `calibration_samples` apply to `--to onnx --dtype int8`, `optimizer`
    to `--to onnx`."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    check_output_path(src_path, dst)  # DST must not be SRC or hold it: --overwrite would delete the input
    if to == "onnx":
        from pretrain.export.onnx_convert import convert_onnx

        return convert_onnx(src_path, Path(dst), dtype, quant, calibration, calibration_samples, overwrite,
                            optimizer)
    if quant != "dynamic" or calibration:
        raise ValueError("--quant / --calibration apply to --to onnx --dtype int8 only")
    if optimizer != "none":
        raise ValueError("--optimizer applies to --to onnx only")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose fp32 or bf16")
    src = open_source(src_path)
    if to in ("hf", "open_clip"):
        refuse_classifier(src.config, src.path)
    src.layout  # noqa: B018 -- built before measuring: the data movement below is what streams
    rss_before = current_rss_mb()
    out = _convert(src, Path(dst), to, dtype, overwrite)
    out["rss_before_mb"] = rss_before
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _convert(src: Source, dst: Path, to: str, dtype: str, overwrite: bool) -> dict[str, Any]:
    if to == "universal":
        if dtype != "fp32":
            raise ValueError("--to universal keeps fp32 master weights and moments; "
                             "--dtype applies to exports")
        return write_universal(src, dst, overwrite)
    if to == "safetensors":
        return write_weights(src, dst, DTYPES[dtype], overwrite)
    return _export_with(src, dst, to, DTYPES[dtype], overwrite)


def _read_import(kind: str, src: Path, arch: str | None, tok_json: str | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    if arch and kind != "open_clip":
        raise ValueError("--arch names an open_clip architecture: use it with --from open_clip")
    if kind == "hf":
        from pretrain.export.hf import import_hf

        return import_hf(src, tok_json)
    if kind == "openai":
        from pretrain.export.openai import import_openai

        return import_openai(src, tok_json)
    if arch:
        from pretrain.export.openai import import_arch

        return import_arch(src, arch, tok_json)
    from pretrain.export.open_clip import CONFIG_FILE, import_open_clip

    if not (src / CONFIG_FILE).is_file():
        raise ValueError(f"{src}: no {CONFIG_FILE}; name the architecture with --arch (e.g. ViT-B-32, "
                         f"ViT-B-16, ViT-L-14, ViT-B-32-quickgelu)")
    return import_open_clip(src, tok_json)


def _pad_token_rows(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[int]:
    """Place a smaller imported token table (OpenAI CLIP's 49,408 rows) into the model's padded one; the
    rows beyond it (our MLM mask token 49408, then padding) keep the model's fresh initialisation, so
    every pretrained row stays exactly as imported. Returns [first, end) of the fresh rows, or []."""
    key = "text.token_embedding.weight"
    table = model.state_dict()[key]
    rows = state[key].shape[0]
    if rows >= table.shape[0]:
        return []
    state[key] = torch.cat([state[key], table[rows:].to(state[key].dtype)])
    return [rows, table.shape[0]]


def build_imported_model(state: dict[str, torch.Tensor], overrides: dict[str, Any], tok_json: str,
                         base_config: str | None = None, seed: int = 0, src: str = "SRC",
                         device: str = "cpu") -> tuple[torch.nn.Module, Config, list[str], list[int]]:
    """(PretrainModel holding the imported towers, its config, fresh top-level modules, fresh token rows):
    `overrides` on `base_config` (default: the embedded demo recipe), the rest initialised from `seed`.
    On the meta device nothing is allocated (shape checks of full-size architectures)."""
    from pretrain.config import embedded_config_path
    from pretrain.models.pretrain_model import PretrainModel

    dotted = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    cfg: Config = load_config(base_config or embedded_config_path(), dotted)
    tok = load_tokenizer(tok_json)
    torch.manual_seed(seed)
    with torch.device(device):
        model = PretrainModel.from_config(cfg, tok)
    from pretrain.export.common import check_import_shapes  # a named error, not torch's size mismatch

    check_import_shapes(state, model.state_dict(), src)
    fresh_rows = _pad_token_rows(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{src}: tensors the model has no place for: {unexpected[:5]}")
    fresh = sorted({k.split(".")[0] for k in missing})
    if set(fresh) - {"decoder", "mlm_head", "logit_bias"}:
        raise ValueError(f"{src}: lacks CLIP tensors the model needs: {[k for k in missing][:5]}")
    return model, cfg, fresh, fresh_rows


def import_checkpoint(kind: str, src: str | Path, dst: str | Path, base_config: str | None = None,
                      tokenizer: str | None = None, seed: int = 0, overwrite: bool = False,
                      arch: str | None = None) -> dict[str, Any]:
    """HF / open_clip / OpenAI CLIP -> our weights export (+ `train.yaml`), for `pretrain train --init-from`.

    The CLIP towers come from SRC; the MAE decoder and MLM head (which those formats lack) are freshly
    initialised from `seed`, and so is the MLM mask row appended to OpenAI CLIP's token table. The model
    config is SRC's; everything else is `base_config`'s (default: the embedded demo recipe). `tokenizer`:
    a tokenizer.json or `clip`; default: SRC's own, else OpenAI CLIP's for a CLIP-pooling checkpoint."""
    from pretrain.export.tokenizers import tokenizer_json_for

    if kind not in IMPORTS:
        raise ValueError(f"--from {kind!r}: choose one of {', '.join(IMPORTS)}")
    check_output_path(src, dst)  # DST must not be SRC or hold it: --overwrite would delete the input
    tok_json = tokenizer_json_for(tokenizer) if tokenizer else None
    state, overrides, tok_json = _read_import(kind, Path(src), arch, tok_json)
    if tok_json is None:
        raise ValueError(f"{src}: holds no tokenizer.json this project can use; pass --tokenizer FILE "
                         "(e.g. one made by `pretrain data tokenizer`) whose vocabulary matches the model, "
                         "or --tokenizer clip for OpenAI CLIP's")
    model, cfg, fresh, fresh_rows = build_imported_model(state, overrides, tok_json, base_config, seed,
                                                         str(src))
    meta = {"config": to_dict(cfg), "tokenizer": tok_json, "step": 0, "source": str(src)}
    summary = write_weights(DictSource(model.state_dict(), meta, str(src)), Path(dst), overwrite=overwrite,
                            extra_files={"train.yaml": dump_yaml(cfg)})
    return {**summary, "from": kind, "fresh": fresh, "fresh_token_rows": fresh_rows,
            "tokenizer": "clip" if model.text.pool_type == "argmax" else "bpe"}


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        if args.src_kind:
            out = import_checkpoint(args.src_kind, args.src, args.dst, args.config, args.tokenizer,
                                    overwrite=args.overwrite, arch=args.arch)
        else:
            if not args.to:
                raise ValueError("give --to universal|safetensors|hf|open_clip|onnx "
                                 "(or --from hf|open_clip|openai)")
            out = convert(args.src, args.dst, args.to, args.dtype, args.overwrite, args.quant,
                          args.calibration, args.calibration_samples, args.optimizer)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"pretrain convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `convert`."""
    p = sub.add_parser("convert", help="checkpoints between layouts and tools (universal, safetensors, "
                       "hf, open_clip; imports)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run dir, DeepSpeed checkpoint, universal checkpoint, weights export "
                   "(with --from: an HF or open_clip model folder, an open_clip weights file with --arch, "
                   "an OpenAI state dict or .pt)")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--to", choices=TARGETS)
    p.add_argument("--from", dest="src_kind", choices=IMPORTS, help="import an existing CLIP model")
    p.add_argument("--dtype", default="fp32", choices=tuple(dict.fromkeys((*DTYPES, *ONNX_DTYPES))),
                   help="exported weights' dtype (bf16: weights exports; fp16/int8: --to onnx)")
    p.add_argument("--quant", default="dynamic", choices=("dynamic", "static"),
                   help="--to onnx --dtype int8: onnxruntime dynamic quantisation (no data) or static "
                   "(activation ranges calibrated on --calibration)")
    p.add_argument("--calibration", help="--quant static: shard URLs whose first images/captions calibrate")
    p.add_argument("--calibration-samples", type=int, default=256, help="samples read from --calibration")
    p.add_argument("--optimizer", default="none", choices=("none", "transformers"),
                   help="--to onnx: also run onnxruntime.transformers' fusing optimizer (fused Attention, "
                   "SkipLayerNormalization, BiasGelu) before quantisation; for GPU providers: slower than "
                   "the default on CPU at small shapes")
    p.add_argument("--config", help="with --from: YAML recipe for the non-model settings (default: demo)")
    p.add_argument("--tokenizer", help="with --from: tokenizer.json to use instead of SRC's, or `clip` "
                   "(OpenAI CLIP's BPE; the default for OpenAI/LAION checkpoints)")
    p.add_argument("--arch", help="with --from open_clip: open_clip architecture name of SRC's weights "
                   "(ViT-B-32, ViT-B-16, ViT-L-14, ...-quickgelu) when SRC has no open_clip_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace DST (only once the new one is complete)")
    p.set_defaults(func=cmd_convert)
