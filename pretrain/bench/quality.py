"""`pretrain bench quality`: which objectives help representation quality, side by side on the same shards.

    pretrain bench quality --out runs/quality [--seeds 0 1 2] [--samples-seen 16384] [--image-size 32]
                           [--recipes NAME ...] [--add-recipe NAME KEY=VALUE ...] [--set KEY=VALUE ...]

For each dataset (synthetic coloured shapes with a held-out split; scikit-learn's real handwritten digits,
upscaled) it trains every recipe from the same seed on the same shards for the same number of samples
(`--samples-seen` / batch steps) and scores each final checkpoint with `pretrain eval` (zero-shot top-1/5,
i2t/t2i R@1/5, linear probe on the train shards' frozen features). Recipes (`--recipes`):

- `contrastive_full`: contrastive only, full images (CLIP)
- `contrastive_flip50`: contrastive only, 50% of patches masked (FLIP)
- `flip50_tail`: FLIP + `objectives.mim.unmasked_tail_steps` (`--tail-fraction` of the steps on full images)
- `default`: the embedded recipe (contrastive + masked image + masked language modeling)
- `default_tail`: default + the unmasked tail (the masked-image loss off for the last steps)
- `shared_pass`: the pre-#14 default: contrastive, MAE pixels and MLM, one 50%-masked pass (FLIP + MAE)
- `separate_views`: contrastive on full images, MAE pixels on its own 50%-masked pass, MLM
- `open_clip_train`: the real open_clip trainer from PyPI, same architecture and hyper-parameters
  (`quality_openclip.py`; its own venv because of its webdataset pin)

`--add-recipe NAME KEY=VALUE ...` adds named ablations, `--seeds 0 1 2` repeats everything per seed and
adds mean ± std per recipe (single runs of these small models differ by several points between seeds).

The model is `SMALL` (ViT 4x128 patch 8, text 4x128) unless `--set` overrides it: the same command scales
to ViT-B on a GPU (`--set model.vision.width=768 model.vision.layers=12 ... --image-size 224`). A `--set`
of a key the bench sets itself (seed, steps, batch, image size, paths: `OWNED`, naming the flag to use) or
that a chosen recipe pins (use `--add-recipe`) is refused, and so, with `open_clip_train`, is one that
open_clip_train cannot follow with the same meaning (`quality_openclip_args.py`).
Output: `OUT/quality.json` and, with `--docs FILE`, a Markdown table appended there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.config import embedded_config_path, load_config

SMALL = [
    "model.vision.patch_size=8", "model.vision.width=128", "model.vision.layers=4", "model.vision.heads=4",
    "model.text.width=128", "model.text.layers=4", "model.text.heads=4", "model.text.context_length=32",
    "model.embed_dim=128", "model.decoder.width=64", "model.decoder.layers=2", "model.decoder.heads=4",
    "data.vocab_size=512", "train.micro_batch=64", "train.precision=fp32", "optim.lr=1e-3",
    "parallel.zero_stage=0", "data.workers=1",
]
"""The CPU-sized model of the bench (`--set` overrides any key)."""

CONTRASTIVE_ONLY = ["objectives.mim.weight=0", "objectives.mlm.weight=0"]
MAE_PIXELS_50 = ["objectives.mim.target=pixels", "objectives.mim.mask_ratio=0.5", "objectives.mim.weight=0.5",
                 "objectives.mlm.weight=0.5"]
"""Pinned, so these rows keep measuring the same recipe whatever the defaults become."""
RECIPES: dict[str, list[str]] = {
    "contrastive_full": [*CONTRASTIVE_ONLY, "objectives.mim.mask_ratio=0"],
    "contrastive_flip50": [*CONTRASTIVE_ONLY, "objectives.mim.mask_ratio=0.5"],
    "flip50_tail": [*CONTRASTIVE_ONLY, "objectives.mim.mask_ratio=0.5"],  # + the unmasked tail
    "default": [],
    "default_tail": [],  # + the unmasked tail
    "shared_pass": ["objectives.mim.shared_pass=true", *MAE_PIXELS_50],
    "separate_views": ["objectives.mim.shared_pass=false", *MAE_PIXELS_50],
    "open_clip_train": [*CONTRASTIVE_ONLY, "objectives.mim.mask_ratio=0"],
}
"""Overrides of each built-in recipe on the embedded defaults (`default` is the defaults themselves)."""
TAILED = ("flip50_tail", "default_tail")
"""Recipes that add `objectives.mim.unmasked_tail_steps` = `--tail-fraction` of the steps."""
METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "linear_probe_top1")


def parse_added_recipes(specs: list[list[str]]) -> dict[str, list[str]]:
    """`--add-recipe NAME KEY=VALUE ...` (repeatable): named ablations on top of the embedded defaults, so
    every row of a published table can be rerun from the command line that made it."""
    added: dict[str, list[str]] = {}
    for spec in specs:
        name, *overrides = spec
        if name in RECIPES or name in added:
            raise ValueError(f"--add-recipe {name}: the name is taken; choose another")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"--add-recipe {name}: {bad[0]!r} is not KEY=VALUE")
        added[name] = overrides
    return added


OWNED = {"train.seed": "--seeds (or --seed)", "train.steps": "--samples-seen",
         "train.micro_batch": "--batch-size", "train.grad_accum": "--batch-size",
         "model.image_size": "--image-size",
         "objectives.mim.unmasked_tail_steps": "--tail-fraction", "data.train": None, "data.tokenizer": None,
         "run.dir": None, "checkpoint.dir": None}
"""Keys the bench sets per run (or that would put every run in one folder): a `--set` of one wins over the
flag, and the rows would describe other runs than those trained (`--set train.seed=7 --seeds 0 1` trained
seed 7 twice, labelled 0 and 1)."""


def set_problems(args: argparse.Namespace) -> list[str]:
    """Every `--set` the bench must refuse: keys it sets itself (`OWNED`), keys a chosen recipe pins (the
    row would be another recipe under its name), and, with open_clip_train, keys open_clip_train cannot
    follow (`quality_openclip_args`: its row must differ from ours in the trainer only)."""
    from pretrain.bench.overrides import owned_key_problems

    owned: dict[str, str | None] = dict(OWNED)
    added = parse_added_recipes(getattr(args, "add_recipe", None) or [])
    for name in [*args.recipes, *added]:
        for kv in RECIPES.get(name, added.get(name, [])):
            owned.setdefault(kv.split("=", 1)[0], f"--add-recipe NAME KEY=VALUE (recipe {name} sets it)")
    problems = owned_key_problems(args.set, owned)
    rest = [kv for kv in args.set or [] if kv.split("=", 1)[0] not in owned]
    if "open_clip_train" in args.recipes:
        from pretrain.bench.quality_openclip_args import open_clip_set_problems

        base = [*SMALL, *RECIPES["open_clip_train"]]
        problems += [f"{p}, so the open_clip_train row would differ from ours in more than the trainer "
                     "(not like-for-like): drop open_clip_train from --recipes, or give our recipes that "
                     "setting with --add-recipe" for p in open_clip_set_problems(rest, base)]
    return problems


def recipe_overrides(name: str, data: dict[str, Any], run_dir: Path, args: argparse.Namespace) -> list[str]:
    """Every override of one run: bench model, data, equal samples seen, then the recipe, then --set."""
    steps = max(1, args.samples_seen // args.batch_size)
    recipe = RECIPES.get(name)
    if recipe is None:
        recipe = parse_added_recipes(getattr(args, "add_recipe", None) or [])[name]
    out = [*SMALL, f"model.image_size={args.image_size}", f"train.micro_batch={args.batch_size}",
           f"train.steps={steps}", f"optim.warmup_steps={max(1, steps // 20)}", f"data.train={data['train']}",
           f"data.tokenizer={data['tokenizer']}", f"run.dir={run_dir}", "checkpoint.every=0",
           "logging.every=10", "logging.progress=false", "logging.tensorboard=false",
           f"train.seed={args.seed}", *recipe]
    if name in TAILED:
        out.append(f"objectives.mim.unmasked_tail_steps={max(1, round(steps * args.tail_fraction))}")
    return out + list(args.set)


def train_ours(overrides: list[str], run_dir: Path) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    # --overwrite-run: a rerun of the bench with the same --out trains each recipe again from scratch
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--overwrite-run", *overrides],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"training failed (exit {r.returncode}): {r.stderr[-1500:]}")
    return json.loads((run_dir / "summary.json").read_text()), wall


def run_recipe(name: str, data: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.evaluation.evaluate import evaluate

    run_dir = out / "runs" / data["name"] / name
    if len(args.seeds) > 1:
        run_dir = run_dir / f"seed{args.seed}"
    overrides = recipe_overrides(name, data, run_dir, args)
    cfg = load_config(embedded_config_path(), overrides)
    samples = cfg.train.steps * cfg.train.micro_batch * cfg.train.grad_accum
    row: dict[str, Any] = {"dataset": data["name"], "recipe": name, "seed": args.seed,
                           "samples_seen": samples}
    try:
        if name == "open_clip_train":
            from pretrain.bench.quality_openclip import ensure_venv, train_open_clip
            from pretrain.checkpoint.convert import import_checkpoint

            python = ensure_venv(out / "cache", args.open_clip_python)
            device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
            folder, wall, samples, check = train_open_clip(cfg, data["tokenizer"], data, run_dir, samples,
                                                           python, device)
            row["samples_seen"] = samples
            row.update(check)  # baseline_trained: False when its weights never moved
            if not check["baseline_trained"]:
                print(f"warning: {data['name']} open_clip_train seed {args.seed}: its weights never moved "
                      f"(logit scale {check['logit_scale_start']} -> {check['logit_scale_end']}, no "
                      f"LayerNorm changed); the row is flagged baseline_trained: false, not a result "
                      f"(log: {run_dir / 'open_clip_train.log'})", file=sys.stderr, flush=True)
            checkpoint = run_dir / "imported"
            import_checkpoint("open_clip", folder, checkpoint, tokenizer=data["tokenizer"], overwrite=True)
        else:
            summary, wall = train_ours(overrides, run_dir)
            row["train_samples_per_s"] = summary["samples_per_s"]
            checkpoint = run_dir
        row.update(wall_s=round(wall, 1), samples_per_s=round(samples / wall, 1))
        result = evaluate(checkpoint, data["val"], data["classnames"], batch_size=256,
                          linear_probe=data["train"])
        row.update({k: result.get(k) for k in METRICS}, chance=result["chance"])
    except Exception as e:  # one failed recipe must not lose the others' numbers
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(row), flush=True)
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of each (dataset, recipe): single runs of these small
    models differ by a few points from seed to seed, more than some of the effects being measured."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r and r.get("baseline_trained", True):  # an untrained baseline is no result
            groups.setdefault((r["dataset"], r["recipe"]), []).append(r)
    out = []
    for (dataset, recipe), rs in groups.items():
        s: dict[str, Any] = {"dataset": dataset, "recipe": recipe, "seeds": [r.get("seed") for r in rs]}
        for k in (*METRICS, "wall_s"):
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                s[k] = statistics.fmean(vals)
                s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    head = ["dataset", "recipe", "seeds", "zero-shot top-1", "i2t R@1", "t2i R@1", "linear probe", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["dataset"], s["recipe"], str(len(s["seeds"]))]
        for k in ("zeroshot_top1", "i2t_r1", "t2i_r1", "linear_probe_top1", "wall_s"):
            fmt = ".1f" if k == "wall_s" else ".3f"
            cells.append("" if k not in s else f"{s[k]:{fmt}} ± {s[k + '_std']:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], command: str, commit: str) -> str:
    head = ["dataset", "recipe", "seed", "zero-shot top-1", "top-5", "i2t R@1", "i2t R@5", "t2i R@1",
            "t2i R@5", "linear probe", "wall s", "samples/s"]
    keys = [*METRICS, "wall_s", "samples_per_s"]
    lines = [f"### Representation quality ({datetime.date.today()}, commit {commit})", "",
             f"`{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["recipe"], str(r.get("seed", ""))] + [
            "" if r.get(k) is None else (f"{r[k]:.3f}" if k in METRICS else str(r[k])) for k in keys]
        if "error" in r:
            cells[3] = f"failed: {r['error'][:80]}"
        elif r.get("baseline_trained") is False:
            cells[1] += " (NOT TRAINED: weights never moved, not a result)"
        lines.append("| " + " | ".join(cells) + " |")
    summary = summarize(rows)
    if any(len(s["seeds"]) > 1 for s in summary):
        lines += ["", "Mean ± standard deviation over seeds:", "", summary_markdown(summary).rstrip("\n")]
    return "\n".join(lines) + "\n"


def cmd_quality(args: argparse.Namespace) -> int:
    from pretrain.bench.quality_data import prepare_dataset

    problems = set_problems(args)
    if problems:  # before any data is written
        raise ValueError("bench quality: " + "; ".join(problems))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    added = parse_added_recipes(args.add_recipe or [])
    recipes = [*args.recipes, *(n for n in added if n not in args.recipes)]
    args.seeds = args.seeds or [args.seed]
    vocab = load_config(embedded_config_path(), [*SMALL, *args.set]).data.vocab_size
    rows = []
    for ds in args.datasets:
        data = prepare_dataset(ds, out / "data", args.image_size, vocab, args.shapes_train, args.shapes_val)
        for seed in args.seeds:
            rows += [run_recipe(name, data, out, argparse.Namespace(**{**vars(args), "seed": seed}))
                     for name in recipes]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2]).stdout.strip() or "unknown"
    command = "pretrain " + " ".join(sys.argv[1:])
    report = {"command": command, "commit": commit, "date": str(datetime.date.today()), "rows": rows,
              "summary": summarize(rows)}
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    table = markdown(rows, command, commit)
    print(table)
    if args.docs:
        with open(args.docs, "a", encoding="utf-8") as f:
            f.write("\n" + table)
    failed = any("error" in r or r.get("baseline_trained") is False for r in rows)
    return 1 if failed and args.strict else 0


def add_quality_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("quality", help="zero-shot, retrieval and linear probe of each recipe (and "
                         "open_clip_train) at equal samples seen", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for data, runs and quality.json")
    p.add_argument("--datasets", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES),
                   help="built-in recipes to run (none: only those of --add-recipe)")
    p.add_argument("--samples-seen", type=int, default=16384,
                   help="training samples per run (16,384: the setting of issue #14; at 8,192 every "
                   "masked-image variant measured was still behind)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--tail-fraction", type=float, default=0.1, help="default_tail: unmasked share of steps")
    p.add_argument("--shapes-train", type=int, default=4096)
    p.add_argument("--shapes-val", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="the seed of a single-seed run")
    p.add_argument("--seeds", type=int, nargs="+", help="run every recipe once per seed; the table adds mean "
                   "± std per recipe (runs go to runs/DATASET/RECIPE/seedN)")
    p.add_argument("--add-recipe", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="an extra recipe: NAME then overrides on the embedded defaults (repeatable)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (model size, precision, ...)")
    p.add_argument("--open-clip-python", help="python of an env with open_clip_train (default: a venv "
                   "created under OUT/cache)")
    p.add_argument("--docs", help="append the Markdown table to this file (e.g. docs/benchmarks.md)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any recipe failed")
    p.set_defaults(func=cmd_quality)
