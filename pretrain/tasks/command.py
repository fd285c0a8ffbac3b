"""`pretrain finetune`: fine-tune for a task with the training loop of `pretrain train`, then optionally
sweep WiSE-FT's weight interpolation.

    pretrain finetune --config F --task classify --train SHARDS --val SHARDS --classnames FILE \\
        [--init-from CKPT] [--wise-ft 0 0.25 0.5 0.75 1] [key=value ...]

The flags are shorthands for config keys (`train.task`, `data.train`, `data.val`, `finetune.classnames`,
`finetune.templates`) and win over the same keys in overrides; then it is `pretrain.train.train`: the same
DeepSpeed engine, launchers (one process, deepspeed, torchrun, ...), checkpoints, metrics and validation
(`eval.every`: `val/top1`). Registered into the `pretrain` command by `pretrain.cli.REGISTRARS`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

TASKS = ("classify",)
"""`--task` values: the `train.task` choices other than `pretrain`."""


def _alphas(values: list[str] | None) -> tuple[list[float], list[str]]:
    """`--wise-ft` values as floats, and any `key=value` overrides argparse swept into them (nargs='+'
    takes every following word that is not an option). Checked here, before anything trains: the sweep
    runs after the whole fine-tune, so a typo (`1.5`, `nan`) found there would cost the run."""
    from pretrain.cli import OVERRIDE

    alphas, extra, bad = [], [], []
    for v in values or []:
        if OVERRIDE.match(v):
            extra.append(v)
            continue
        try:
            alphas.append(float(v))
        except ValueError:
            raise ValueError(f"--wise-ft: {v!r} is not a number (mixing coefficients in [0, 1], e.g. "
                             "--wise-ft 0 0.5 1)") from None
        if not (math.isfinite(alphas[-1]) and 0.0 <= alphas[-1] <= 1.0):
            bad.append(v)
    if bad:
        raise ValueError(f"--wise-ft: mixing coefficients must be in [0, 1], got {', '.join(bad)} (e.g. "
                         "--wise-ft 0 0.5 1)")
    if values and not alphas:
        raise ValueError(f"--wise-ft: no mixing coefficient, only the overrides {' '.join(values)} (e.g. "
                         "--wise-ft 0 0.5 1)")
    return alphas, extra


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the flags stand for (JSON-quoted: shard URLs with braces stay strings)."""
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: unknown task; pretrain finetune supports {', '.join(TASKS)}")
    out = [f"train.task={args.task}", f"data.train={json.dumps(args.train)}"]
    for key, value in (("data.val", args.val), ("finetune.classnames", args.classnames),
                       ("finetune.templates", args.templates)):
        if value:
            out.append(f"{key}={json.dumps(value)}")
    return out


def cmd_finetune(args: argparse.Namespace) -> int:
    from launch.logs import quiet_other_ranks
    from launch.mpi import launch_rank_info
    from parallel import groups
    from pretrain.checkpoint.atomic import CheckpointSaveError, checkpoint_root
    from pretrain.config import embedded_config_path, load_config
    from pretrain.train import train

    alphas, extra = _alphas(args.wise_ft)
    overrides = [*(args.overrides or []), *extra, *flag_overrides(args)]
    me = launch_rank_info()  # the world size under mpi4py's fallback too
    cfg = load_config(args.config or embedded_config_path(), overrides, world_size=me.world_size)
    if alphas and not cfg.data.val.strip():
        raise ValueError("--wise-ft scores each mixing coefficient on held-out shards: pass --val SHARDS")
    quiet_other_ranks(me.rank, cfg.logging.all_ranks)
    try:
        summary: dict[str, Any] = train(cfg, resume=args.resume, init_from=args.init_from,
                                        overwrite_run=args.overwrite_run)
    except CheckpointSaveError as e:
        print(f"pretrain: error on rank {groups.rank()}: {e}", file=sys.stderr, flush=True)
        return 1
    if alphas:
        from pretrain.evaluation.wise_ft import format_table, wise_ft_sweep

        # the run's checkpoints, wherever checkpoint.dir puts them (the sweep's default: RUN_DIR/checkpoints)
        summary["wise_ft"] = wise_ft_sweep(cfg.run.dir, alphas, checkpoint=checkpoint_root(cfg))
        if groups.rank() == 0:
            print(format_table(summary["wise_ft"]), file=sys.stderr, flush=True)
    if groups.rank() == 0:
        print(json.dumps(summary), flush=True)
    return 0


def register(sub: argparse._SubParsersAction, **_: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune for a task (classify: image tower + zero-shot-initialised "
                       "linear head), optionally with a WiSE-FT sweep")
    p.add_argument("--config", help="YAML recipe of the model (default: the embedded configs/demo.yaml); "
                   "its model.* must match --init-from's")
    p.add_argument("--task", required=True, help=f"what to fine-tune for: {', '.join(TASKS)}")
    p.add_argument("--train", required=True, help="labelled training shard URLs (.cls per sample)")
    p.add_argument("--val", help="labelled held-out shard URLs: validation (eval.every) and --wise-ft")
    p.add_argument("--classnames", help="classnames.txt that the .cls labels index (finetune.classnames)")
    p.add_argument("--templates", help="prompt templates for the zero-shot head (finetune.templates)")
    p.add_argument("--init-from", help="pretrained weights: a run directory, checkpoint, universal "
                   "checkpoint, or a `pretrain convert` output (--to safetensors|universal, --from "
                   "hf|open_clip); an HF / open_clip model folder (or a --to hf|open_clip export) is "
                   "imported with `pretrain convert --from hf|open_clip` first")
    p.add_argument("--resume", help="'latest' or a checkpoint of this fine-tuning run")
    p.add_argument("--overwrite-run", action="store_true", help="start over in a run.dir that holds another "
                   "run: delete its checkpoints and metrics first (a fresh start there is refused otherwise)")
    p.add_argument("--wise-ft", nargs="+", metavar="ALPHA", help="after training, score the interpolation "
                   "(1 - ALPHA) x zero-shot + ALPHA x fine-tuned for each ALPHA on --val (JSON + table, "
                   "RUN_DIR/wise_ft.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=cmd_finetune)
