"""`pretrain` command line: train, eval, data synth|tokenizer, config, demo.

Each subcommand parses its own few flags and hands a typed Config (or plain arguments) to library code;
nothing below this file sees argparse.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import sys
from pathlib import Path

from launch.env import RendezvousError
from launch.logs import install_filters, quiet_other_ranks, setup_logging
from pretrain.config import (
    Config,
    ConfigError,
    dump_yaml,
    embedded_config_path,
    field_help,
    load_config,
    markdown_reference,
)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or embedded_config_path(), args.overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (default: the embedded configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.steps=100 data.train='shards/{0..7}.tar'")


def cmd_train(args: argparse.Namespace) -> int:
    from launch.signals import install_early

    install_early()  # first: a stop signal during the imports below is kept for train() (it exits 75)
    from launch.mpi import launch_rank_info
    from parallel import groups
    from pretrain.checkpoint.atomic import CheckpointSaveError
    from pretrain.train import train

    # Validate against the launcher's world size before any process group exists (mpi4py included).
    me = launch_rank_info()
    cfg = load_config(args.config or embedded_config_path(), args.overrides, world_size=me.world_size)
    quiet_other_ranks(me.rank, cfg.logging.all_ranks)  # ranks > 0: warnings and errors only
    try:
        summary = train(cfg, resume=args.resume, init_from=args.init_from, overwrite_run=args.overwrite_run)
    except CheckpointSaveError as e:  # raised on every rank together; each says so and exits
        print(f"pretrain: error on rank {groups.rank()}: {e}", file=sys.stderr, flush=True)
        return 1
    if groups.rank() == 0:
        print(json.dumps(summary), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Single process, or every rank of a launcher (deepspeed, torchrun, mpirun, srun): each rank encodes
    its share of the shards and rank 0 prints the (identical) result. A fine-tuned classifier's checkpoint
    (`train.task=classify`) is scored for accuracy instead (`pretrain.evaluation.classifier_eval`)."""
    from launch.mpi import launch_rank_info
    from parallel import groups
    from pretrain.checkpoint.sources import open_source
    from pretrain.evaluation import classifier_eval
    from pretrain.evaluation.evaluate import eval_device, evaluate, model_from_source
    from pretrain.evaluation.layout import resolve_eval_data

    if args.suite or args.plot:
        from pretrain.evaluation.suite import run_suite_cli

        classifier_eval.refuse_suite(args.checkpoint or [], "--suite" if args.suite else "--plot")
        return run_suite_cli(args)
    if not args.data:
        raise ValueError("pretrain eval needs --data (shards or a CLIP_benchmark folder) or --suite FILE")
    if not args.checkpoint or len(args.checkpoint) != 1:
        raise ValueError("pretrain eval needs exactly one --checkpoint (several: use --suite to compare)")
    if args.few_shot and not args.linear_probe:
        if classifier_eval.checkpoint_task(args.checkpoint[0]) == classifier_eval.CLASSIFY_TASK:
            classifier_eval.refuse_flags(args.checkpoint[0], args)
        raise ValueError("--few-shot K draws K labelled samples per class from --linear-probe TRAIN_SHARDS; "
                         "pass both")
    me = launch_rank_info()
    if me.world_size > 1:
        quiet_other_ranks(me.rank, False)
        groups.init_distributed(args.timeout_s, tp=1)
    src = open_source(args.checkpoint[0])  # first, as before: a wrong checkpoint path is named first
    if classifier_eval.is_classifier(src.config):
        classifier_eval.refuse_flags(args.checkpoint[0], args)
        result = classifier_eval.evaluate_classifier(src, args.data, args.classnames, split=args.split,
                                                     batch_size=args.batch_size, max_samples=args.max_samples,
                                                     workers=args.workers)
    else:
        bundle = model_from_source(src)
        bundle[0].to(eval_device())
        ds = resolve_eval_data(args.data, args.classnames, args.templates, split=args.split)
        result = evaluate(args.checkpoint[0], ds.urls, ds.classnames, batch_size=args.batch_size,
                          max_samples=args.max_samples, linear_probe=args.linear_probe, model_bundle=bundle,
                          templates=ds.templates, few_shot=args.few_shot, workers=args.workers,
                          rerank=args.rerank)
        if args.binding:  # every rank computes the same numbers; no collectives
            from pretrain.evaluation.binding import binding_probe

            model, tokenizer, cfg = bundle
            result.update(binding_probe(model, tokenizer, cfg, ds.urls, args.max_samples, args.batch_size))
    if groups.rank() != 0:
        return 0
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>14}: {v}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from data_pipelines.synth import write_synthetic_shards

    summary = write_synthetic_shards(args.out, samples=args.samples, samples_per_shard=args.samples_per_shard,
                                     image_size=args.image_size, seed=args.seed,
                                     compositional=args.compositional, overwrite=args.overwrite)
    print(json.dumps(summary, default=str), flush=True)
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import train_tokenizer_from_shards

    tok = train_tokenizer_from_shards(args.data, args.vocab_size, args.samples)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size}), flush=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(markdown_reference())
        return 0
    if args.keys:
        for key, tname, default, doc in field_help():
            print(f"{key} ({tname}, default {default!r}): {doc}")
        return 0
    sys.stdout.write(dump_yaml(_load(args)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pretrain.demo import DemoTrainingFailed, run_demo

    try:
        result = run_demo(Path(args.out), procs=args.procs, overrides=args.overrides)
    except DemoTrainingFailed as e:
        print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        return e.status
    print(json.dumps(result), flush=True)
    return 0


def _register_optional(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
                       data: argparse._SubParsersAction) -> None:
    """Subcommands owned by other modules: each exposes `register(sub=..., bench=..., data=...)` and adds
    parsers (with `set_defaults(func=...)`) to the top level, `pretrain bench ...` or `pretrain data ...`."""
    import importlib

    for module in REGISTRARS:
        importlib.import_module(module).register(sub=sub, bench=bench, data=data)


# Modules that add subcommands via register(sub, bench, data); append yours here.
REGISTRARS: list[str] = ["pretrain.plan.memory", "launch.cli", "data_pipelines.commands",
                         "pretrain.bench.commands", "pretrain.evaluation.embed",
                         "pretrain.checkpoint.convert", "pretrain.tasks.command"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (single process or under any launcher)")
    _add_config_args(p)
    p.add_argument("--resume", help="'latest' (newest checkpoint of this run, if any), a checkpoint path, or "
                   "a universal checkpoint (any data/tensor-parallel layout)")
    p.add_argument("--init-from", help="start from these weights with a fresh optimizer at step 0: a "
                   "`pretrain convert` output (--from hf|open_clip, --to safetensors|universal) "
                   "or a checkpoint")
    p.add_argument("--overwrite-run", action="store_true", help="start over in a run.dir (or "
                   "checkpoint.dir) that holds another run: delete its checkpoints, metrics.jsonl, "
                   "summary.json, tensorboard/, keys/, tokenizer.json and a fine-tune's "
                   "zeroshot.safetensors and wise_ft.json first (without it such a start is refused)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot classification and retrieval from a checkpoint (a fine-tuned "
                       "classifier's: its top-1/top-5 accuracy and loss)")
    p.add_argument("--checkpoint", action="append", help="run directory or checkpoint folder (with --suite: "
                   "may be given several times to compare them side by side); a fine-tuned classifier's "
                   "(train.task=classify) reports classify_top1/top5/loss on --data")
    p.add_argument("--data", help="held-out shard URLs (brace-expandable), or a dataset folder in LAION "
                   "CLIP_benchmark's layout (SPLIT/nshards.txt + 0.tar.., classnames.txt, "
                   "zeroshot_classification_templates.txt)")
    p.add_argument("--classnames", help="classnames.txt; `.cls` of each sample indexes it (default: "
                   "classnames.txt beside the shards or in the --data folder); for a fine-tuned classifier "
                   "optional, and refused unless it holds the checkpoint's class names")
    p.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {c} or {} "
                   "(default: zeroshot_classification_templates.txt beside the shards, else built-in)")
    p.add_argument("--split", default="test", help="split folder of a CLIP_benchmark --data folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    p.add_argument("--linear-probe", metavar="TRAIN_SHARDS",
                   help="labelled train shard URLs: fit logistic regression on their frozen image features "
                   "(C chosen on a held-out split) and report linear_probe_top1 on --data")
    p.add_argument("--workers", type=int, default=0, help="decode workers per rank")
    p.add_argument("--timeout-s", type=int, default=1800,
                   help="collective timeout under a launcher (a rank waits this long for the others)")
    p.add_argument("--few-shot", metavar="K", type=int, default=0,
                   help="with --linear-probe: also fit on K seeded samples per class of those train "
                   "features and report few_shot_top1")
    p.add_argument("--suite", metavar="SUITE_YAML", help="evaluate the datasets and tasks a YAML lists, for "
                   "each checkpoint; writes JSON + Markdown per checkpoint and a comparison into --out")
    p.add_argument("--out", metavar="DIR", help="output folder of --suite / --plot")
    p.add_argument("--plot", metavar="METRIC", help="evaluate every complete checkpoint of each run and draw "
                   "METRIC (e.g. zeroshot_top1) against the training step as a PNG in --out")
    p.add_argument("--rerank", metavar="K", type=int, default=0,
                   help="re-rank each query's top-K contrastive candidates by the fusion encoder's "
                   "image-text match score (a checkpoint with model.fusion.layers > 0 and "
                   "objectives.itm.weight > 0) and report i2t_rerank_r1 / t2i_rerank_r1")
    p.add_argument("--binding", action="store_true",
                   help="attribute-binding probe on compositional shards (`data synth --compositional`): "
                   "how often the true caption outscores its swaps, dual encoder vs ITM")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    data_parser = sub.add_parser("data", help="write and prepare shards")
    data = data_parser.add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="synthetic image-caption WebDataset shards")
    p.add_argument("out")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compositional", action="store_true",
                   help="two objects per image, captions whose word order binds colour to shape "
                        "(\"red circle left of blue square\"), and the swaps the binding probe scores")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty OUT: replace its shards with this prefix, sizes.json, "
                        "classnames.txt and the templates file (other files stay)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("tokenizer", help="train a BPE tokenizer on the captions of shards")
    p.add_argument("--data", required=True, help="shard URLs (brace-expandable)")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--samples", type=int, default=20000, help="captions to read")
    p.set_defaults(func=cmd_data_tokenizer)

    p = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key, its type, default and meaning")
    p.add_argument("--markdown", action="store_true", help="the same as a Markdown table (README reference)")
    p.set_defaults(func=cmd_config)

    bench = sub.add_parser("bench", help="benchmarks (throughput, memory)").add_subparsers(
        dest="bench_cmd", required=True)
    # --- bench subcommands: each owner registers its own below (data_pipelines, pretrain, parallel) ---
    _register_optional(sub, bench, data)
    # --- end bench subcommands ---

    p = sub.add_parser("demo", help="synthesise data, train on 2 CPU ranks with the deepspeed launcher, eval")
    p.add_argument("--out", default="runs/demo", help="folder for shards and the run")
    p.add_argument("--procs", type=int, default=2, help="ranks to launch")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for training")
    p.set_defaults(func=cmd_demo)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*=")
"""A `dotted.key=value` override (as opposed to a typo'd flag or a stray positional)."""


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse with `key=value` overrides accepted anywhere on the line, as people type them: argparse takes
    the overrides positional once, so overrides after an option (`train a=1 --resume latest b=2`) come
    back as unknown arguments; they are appended, in order, to the subcommand's overrides. Anything else
    unknown is still an error."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not (OVERRIDE.match(a) and hasattr(args, "overrides"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from launch.signals import install_early, release_early

    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words[:1] == ["train"]:  # a rank's first moment: build_parser imports torch (seconds); see cmd_train
        install_early()
    install_filters()  # before build_parser's imports: some noise is printed while libraries import
    try:
        args = parse_args(build_parser(), argv)
        setup_logging(args.verbose)
        return args.func(args)
    except ConfigError as e:
        print(f"pretrain: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except RendezvousError as e:  # an expected launch failure: one timestamped line, no traceback
        logging.getLogger("mmpt.launch").error("%s", e)
        return 1
    finally:
        release_early()  # not taken over by train(): this process's own handlers back


def entry() -> None:
    """The `pretrain` program (console script and `python -m pretrain.cli`): `main`, then exit.

    Everything alive at that point dies with the process, so `gc.freeze()` spares the interpreter's final
    collections a walk over torch's, DeepSpeed's and sympy's object graphs: about 1 s of every command's
    exit on a CPU (a training rank's exit 1.3 s -> 0.2 s). Not in `main`, which tests call in-process.
    A rank that succeeded leaves its process group together with the others first (`groups.shutdown`)."""
    rc = main()
    if rc == 0 and "torch.distributed" in sys.modules:  # a distributed command that succeeded on this rank
        from parallel import groups

        groups.shutdown()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
