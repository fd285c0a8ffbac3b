"""`pretrain bench eval`: images/s of `pretrain eval` on 1 rank vs N ranks, same checkpoint, same shards.

    pretrain bench eval --out runs/bench-eval [--ranks 1 2] [--samples 2048] [key=value ...]

Writes synthetic held-out shards at the configured image size and a weights export of the configured model
(random init: throughput does not depend on what the weights learned), then runs the real CLI once per
rank count: `pretrain eval` as one process, and under torchrun for more ranks. Each run reports the time
of encoding plus metrics (`seconds`, not the start-up or model load) and the metrics, which must be equal
between rank counts (`metrics_equal`). CPU: torchrun gives each rank one thread; the single process uses
torch's default threads, so on a 2-core machine both sides use both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TIMING = ("seconds", "images_per_s")


def _prepare(out: Path, samples: int, per_shard: int, overrides: list[str]) -> dict[str, str]:
    import torch

    from data_pipelines.synth import write_synthetic_shards
    from data_pipelines.tokenizer import train_tokenizer_from_shards
    from pretrain.checkpoint.sources import DictSource
    from pretrain.checkpoint.universal import write_weights
    from pretrain.config import embedded_config_path, load_config, to_dict
    from pretrain.models.pretrain_model import PretrainModel

    cfg = load_config(embedded_config_path(), overrides)
    val = write_synthetic_shards(out / "val", samples=samples, samples_per_shard=per_shard,
                                 image_size=cfg.model.image_size, seed=1)
    tok = train_tokenizer_from_shards(val["urls"], cfg.data.vocab_size, 2000)
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random init"), out / "weights", overwrite=True)
    return {"weights": str(out / "weights"), "val": val["urls"],
            "classnames": str(out / "val" / "classnames.txt")}


def _run(ranks: int, paths: dict[str, str], batch_size: int) -> dict[str, Any]:
    args = ["eval", "--checkpoint", paths["weights"], "--data", paths["val"], "--classnames",
            paths["classnames"], "--batch-size", str(batch_size), "--json"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.cli", *args]
    else:
        from launch.rendezvous import free_port

        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", "-m", "pretrain.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                       if ranks > 1 else dict(os.environ))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def run_eval_bench(out: Path, ranks: list[int], samples: int, per_shard: int, batch_size: int,
                   overrides: list[str]) -> dict[str, Any]:
    paths = _prepare(out, samples, per_shard, overrides)
    runs = {n: _run(n, paths, batch_size) for n in ranks}
    base = runs[ranks[0]]
    result: dict[str, Any] = {"samples": base["samples"], "batch_size": batch_size, "overrides": overrides,
                              "cpu_count": os.cpu_count(), "ranks": {}}
    for n, r in runs.items():
        result["ranks"][str(n)] = {"seconds": r["seconds"], "images_per_s": r["images_per_s"],
                                   "speedup": round(r["images_per_s"] / base["images_per_s"], 3)}
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in runs.values()]
    result["metrics_equal"] = all(s == strip[0] for s in strip)
    result["metrics"] = strip[0]
    return result


def add_eval_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("eval", help="pretrain eval images/s on 1 vs N ranks (same metrics)",
                         description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-eval", help="folder for the shards and the weights")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model config overrides of the embedded default")
    p.set_defaults(func=cmd_eval_bench)


def cmd_eval_bench(args: argparse.Namespace) -> int:
    if any(n < 1 for n in args.ranks):
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    result = run_eval_bench(Path(args.out), args.ranks, args.samples, args.samples_per_shard, args.batch_size,
                            args.overrides)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for n, r in result["ranks"].items():
            print(f"{n} rank(s): {r['images_per_s']:8.1f} images/s ({r['seconds']:.2f} s, x{r['speedup']})")
        print(f"metrics equal across rank counts: {result['metrics_equal']}")
    return 0 if result["metrics_equal"] else 1
