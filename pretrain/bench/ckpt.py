"""`pretrain bench ckpt`: GB/s of saving a ZeRO-3 checkpoint, converting it to universal, and loading it back.

One process builds the configured model in a DeepSpeed ZeRO-3 engine and then times:
* save: our atomic save (DeepSpeed files + fsync + sha256 + marker), bytes on disk / seconds;
* convert: `pretrain convert --to universal` in a child process (so its peak RSS is its own: streaming
  means it stays near a few of the largest tensors, not the model), bytes written / seconds;
* load: the universal checkpoint into the engine (`pretrain/checkpoint/universal_load.py`) and DeepSpeed's
  own load (`checkpoint.atomic.load_deepspeed`: files checked, every torch.load weights-only).

Make the model larger with the usual overrides (e.g. model.vision.width=768 model.vision.layers=12).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _rate(nbytes: int, seconds: float) -> dict[str, Any]:
    return {"bytes": nbytes, "seconds": round(seconds, 4),
            "gb_per_s": round(nbytes / max(seconds, 1e-9) / 1e9, 4)}


def model_size(n_params: int) -> dict[str, Any]:
    """The fp32 model size. `fp32_model_mb` has always been MiB (2^20 bytes), like the converter's
    `peak_rss_mb` / `rss_before_mb` it is compared with (tests/e2e/test_bench_ckpt.py), so it stays MiB and
    `fp32_model_mib` names the unit; `fp32_model_bytes` is exact. The stage sizes are bytes, printed in
    MB = 10^6 bytes next to GB/s = 10^9 bytes/s."""
    mib = round(n_params * 4 / 2**20, 1)
    return {"fp32_model_mb": mib, "fp32_model_mib": mib, "fp32_model_bytes": n_params * 4}


def run_ckpt_bench(cfg: Any, workdir: Path) -> dict[str, Any]:
    from data_pipelines.tokenizer import train_tokenizer
    from parallel import groups
    from parallel.engine import build_engine
    from pretrain.bench.step import synthetic_batches
    from pretrain.checkpoint import atomic as ckpt
    from pretrain.checkpoint.sources import UniversalSource
    from pretrain.checkpoint.universal_load import load_universal
    from pretrain.config import engine_spec, to_dict
    from pretrain.models.pretrain_model import PretrainModel
    from pretrain.parallelize import parallelize

    groups.init_distributed(cfg.parallel.timeout_s, 1)
    tok = train_tokenizer([f"a photo of a thing number {i}" for i in range(200)], cfg.data.vocab_size)
    tok.save(workdir / "tokenizer.json")
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _ = build_engine(engine_spec(cfg), parallelize(model, cfg), 1)
    batch = next(synthetic_batches(cfg, tok.vocab_size))  # one step: Adam moments exist, as in training
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    out = engine({k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()})
    engine.backward(out["loss"])
    engine.step()
    tok_json = (workdir / "tokenizer.json").read_text()
    client = {"mmpt": {"step": 1, "config": to_dict(cfg), "tokenizer": tok_json,
                       "data_positions": [], "dp_world": 1, "tp": 1, "rng": torch.get_rng_state()}}
    root = workdir / "checkpoints"
    t0 = time.perf_counter()
    tag = ckpt.save_atomic(engine, root, 1, client)
    save = _rate(_dir_bytes(root / tag), time.perf_counter() - t0)

    uni = workdir / "universal"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "convert", str(root / tag), str(uni),
                        "--to", "universal"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"convert failed: {r.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    child = json.loads(r.stdout.strip().splitlines()[-1])
    convert = _rate(_dir_bytes(uni), child["seconds"])
    convert["wall_s_with_startup"] = round(wall, 2)  # process start + imports + meta model, once
    convert["peak_rss_mb"] = child["peak_rss_mb"]  # the converter's own peak (imports included)
    convert["rss_before_mb"] = child["rss_before_mb"]  # after imports and opening the source

    t0 = time.perf_counter()
    load_universal(engine, UniversalSource(uni))
    load_uni = _rate(_dir_bytes(uni), time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.load_deepspeed(engine, root, tag)  # DeepSpeed's own load, weights-only
    load_ds = _rate(_dir_bytes(root / tag), time.perf_counter() - t0)
    return {"params": n_params, **model_size(n_params), "save": save,
            "convert_universal": convert, "load_universal": load_uni, "load_deepspeed": load_ds,
            "device": str(engine.device), "workdir": str(workdir)}


def cmd_ckpt(args: argparse.Namespace) -> int:
    """Run the bench; print JSON or one line per stage (MB = 10^6 bytes, GB/s = 10^9 bytes/s; RSS in MiB)."""
    from pretrain.config import embedded_config_path, load_config

    overrides = [*args.overrides, "parallel.zero_stage=3", "parallel.tp=1"]
    cfg = load_config(args.config or embedded_config_path(), overrides)
    if args.keep:
        out = run_ckpt_bench(cfg, Path(tempfile.mkdtemp(prefix="mmpt-bench-ckpt-", dir=args.workdir)))
    else:
        with tempfile.TemporaryDirectory(dir=args.workdir) as d:
            out = run_ckpt_bench(cfg, Path(d))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"model: {out['params'] / 1e6:.1f}M params ({out['fp32_model_bytes'] / 1e6:.1f} MB = "
              f"{out['fp32_model_mib']} MiB fp32)")
        for k in ("save", "convert_universal", "load_universal", "load_deepspeed"):
            v = out[k]
            extra = f", peak RSS {v['peak_rss_mb']} MiB" if v.get("peak_rss_mb") else ""  # VmHWM / 1024
            print(f"{k:18s} {v['bytes'] / 1e6:9.1f} MB in {v['seconds']:.3f} s = {v['gb_per_s']:.3f} GB/s"
                  + extra)
    return 0


def add_ckpt_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("ckpt", help="GB/s of checkpoint save, universal conversion and load")
    p.add_argument("--config", help="YAML recipe (default: the embedded demo)")
    p.add_argument("--workdir", help="where to write the temporary checkpoints (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints written (path in the output)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_ckpt)
