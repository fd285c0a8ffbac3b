"""Writing layout-free checkpoints and weight exports from any `ckpt_source.Source`.

Universal checkpoint (`pretrain convert SRC DST --to universal`, `checkpoint.universal=true`, or a
`--resume` at another layout)::

    DST/universal.json          format, step, optimizer step, LR-schedule and loss-scaler state, optimizer
                                hyper-parameters, data positions, RNG, config, the source's layout and
                                `source_sha256` (its completion marker's, so a resume can tell it is a copy
                                of that very checkpoint), and per parameter its full shape and
                                `tp_split_dim` (the dimension TP ranks split it along, or null)
    DST/tokenizer.json
    DST/fp32.safetensors        full fp32 master weights, one tensor per parameter
    DST/exp_avg.safetensors     Adam first moments (same names and shapes; none for the parameters listed
                                in `frozen`, trained under `train.freeze`: they had no optimizer state)
    DST/exp_avg_sq.safetensors  Adam second moments
    DST/manifest.json           written last: every file's size and sha256, every tensor's too

`--resume DST` loads it under any (dp', tp') (pretrain/checkpoint/universal_load.py): each rank slices
the full tensor along `tp_split_dim` for its TP rank, then takes its ZeRO 1-3 partition.

Weights export (`--to safetensors`): `model.safetensors` (fp32 or bf16), `config.json`
(`{"format": "mmpt-weights", "config": ..., "step": ...}`), `tokenizer.json`, `manifest.json`.

Both are written tensor by tensor into a temporary folder renamed into place at the end, so peak memory
is a few parameters and a crash leaves no half-written output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.sources import OPTIM_KEYS, UNIVERSAL_META, WEIGHTS_CONFIG, WEIGHTS_FILE, Source
from pretrain.checkpoint.tensor_files import SafetensorsWriter, staged_output, write_manifest

FORMAT_VERSION = 1
_META_KEYS = ("step", "config", "data_positions", "dp_world", "tp", "rng", "optimizer_step", "param_groups",
              "loss_scaler", "lr_scheduler", "global_samples", "skipped_steps", "source_sha256",
              "val_pending")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_universal(src: Source, dst: Path, overwrite: bool = False) -> dict[str, Any]:
    """Convert `src` (which must carry optimizer state) into a universal checkpoint at `dst`."""
    if not src.has_optimizer:
        raise ValueError(f"{src.path}: holds no Adam moments (not a ZeRO 1-3 training checkpoint); "
                         "a universal checkpoint needs them to resume training exactly")
    layout = src.layout  # (builds the meta model once: not part of the timed data movement)
    t0 = time.perf_counter()
    specs = [(n, torch.float32, tuple(e["shape"])) for n, e in layout.items()]
    with staged_output(dst, overwrite) as tmp:
        frozen = src.frozen  # `train.freeze`: weights only (a resume that trains them starts at zero moments)
        moment_specs = [spec for spec in specs if spec[0] not in frozen]
        writers = {k: SafetensorsWriter(tmp / f"{k}.safetensors", specs if k == "fp32" else moment_specs)
                   for k in ("fp32", *OPTIM_KEYS)}
        for name in layout:
            for key, writer in writers.items():
                if key == "fp32" or name not in frozen:
                    writer.write(name, src.tensor(name, key).float())
        entries = {f"{k}.safetensors": w.close() for k, w in writers.items()}
        meta = {"format": "mmpt-universal", "version": FORMAT_VERSION, "source": str(src.path),
                **{k: _json_safe(src.meta.get(k)) for k in _META_KEYS}, "params": layout,
                "frozen": sorted(frozen),
                **({"classnames": src.meta["classnames"]} if src.meta.get("classnames") else {})}
        (tmp / UNIVERSAL_META).write_text(json.dumps(meta, indent=1))
        (tmp / "tokenizer.json").write_text(src.meta["tokenizer"])
        write_manifest(tmp, entries, kind="universal")
    nbytes = sum(e["bytes"] for e in entries.values())
    return {"to": "universal", "out": str(dst), "params": len(layout), "bytes": nbytes,
            "seconds": round(time.perf_counter() - t0, 3)}


def write_weights(src: Source, dst: Path, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Consolidated single-device weights (`model.safetensors`) + config + tokenizer, streamed;
    `extra_files` (name -> text) go into the same staged folder, under the same manifest."""
    layout = src.layout
    t0 = time.perf_counter()
    specs = [(n, dtype, tuple(e["shape"])) for n, e in layout.items()]
    with staged_output(dst, overwrite) as tmp:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, specs, metadata={"format": "pt"})
        for name in layout:
            writer.write(name, src.tensor(name).to(dtype))
        entry = writer.close()
        (tmp / WEIGHTS_CONFIG).write_text(json.dumps({
            "format": "mmpt-weights", "version": FORMAT_VERSION, "dtype": str(dtype).replace("torch.", ""),
            "step": src.meta.get("step"), "config": src.meta["config"], "tokenizer": src.meta["tokenizer"],
            "params": layout,
            **({"classnames": src.meta["classnames"]} if src.meta.get("classnames") else {})}, indent=1))
        (tmp / "tokenizer.json").write_text(src.meta["tokenizer"])
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp, {WEIGHTS_FILE: entry}, kind="weights")
    return {"to": "safetensors", "out": str(dst), "params": len(layout), "bytes": entry["bytes"],
            "seconds": round(time.perf_counter() - t0, 3)}
