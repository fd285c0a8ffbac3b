"""Every `pretrain bench` subcommand, registered in one place (hooked into the CLI through
`pretrain.cli.REGISTRARS`).

Registration only: the benchmarks live in `step.py` (training-step throughput, FLOPs, MFU, with the
open_clip side-by-side of `vs_open_clip.py`), `loss.py` (contrastive-loss peak memory), `ckpt.py`
(checkpoint save/convert/load speed and memory), `eval_scaling.py` (`pretrain eval` images/s on 1 vs
N ranks), `infer.py` (inference speed and kept accuracy per backend and dtype), `quality.py`
(representation quality per recipe), `cross_site.py` (training across sites vs one job: zero-shot and link
bytes) and `data_pipelines/bench.py` (data pipeline vs a plain
webdataset reference).
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_bench(args: argparse.Namespace) -> int:
    from data_pipelines.bench import run_bench

    result = run_bench(args.shards, batch_size=args.batch_size, workers=args.workers,
                       image_size=args.image_size, batches=args.batches, warmup=args.warmup,
                       tokenizer=args.tokenizer, crop_scale=tuple(args.crop_scale), repeats=args.repeats)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for name in ("ours", "reference"):
            r = result[name]
            print(f"{name:<9} {r['samples_per_s']:9.1f} samples/s, "
                  f"{r['samples_per_cpu_s']:9.1f} per CPU-second")
        print(f"ratio     {result['ratio']:9.2f}x per core ({result['ratio_wall']:.2f}x wall clock); "
              f"reference: {result['reference_pipeline']}")
        speed = result["tokenize_captions_per_s"]
        print("tokenize  " + ", ".join(f"{k} {v:.0f} captions/s" for k, v in speed.items()
                                       if k in ("bpe", "clip")))
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `bench step`, `bench loss`, `bench ckpt`, `bench quality`, `bench eval`, `bench infer` and
    `bench data`."""
    from pretrain.bench.ckpt import add_ckpt_parser
    from pretrain.bench.cross_site import add_cross_site_parser
    from pretrain.bench.eval_scaling import add_eval_parser
    from pretrain.bench.fusion import add_fusion_parser
    from pretrain.bench.infer import add_infer_parser
    from pretrain.bench.loss import add_loss_parser
    from pretrain.bench.quality import add_quality_parser
    from pretrain.bench.step import add_step_parser

    add_loss_parser(bench)
    add_step_parser(bench)
    add_ckpt_parser(bench)
    add_quality_parser(bench)
    add_eval_parser(bench)
    add_infer_parser(bench)
    add_fusion_parser(bench)
    add_cross_site_parser(bench)
    p = bench.add_parser("data", help="data pipeline samples/s vs. a plain webdataset reference")
    p.add_argument("--shards", required=True,
                   help="shard URLs (e.g. written by `pretrain data synth --image-size 512`)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for both pipelines")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per pipeline, summed")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.6, 1.0], metavar=("MIN", "MAX"))
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: train one on the captions)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
