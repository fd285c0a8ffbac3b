"""`pretrain bench fusion`: does the fusion encoder help? ITM re-ranking R@1 and the attribute-binding probe,
fusion vs contrastive-only, per seed, on the compositional synthetic set (`data synth --compositional`).

Per seed: compositional train / held-out shards, then two single-process CPU runs of one small recipe at
the same samples seen: `contrastive` (CLIP loss only) and `fusion` (CLIP loss + ITM with hard negatives +
the image-conditioned MLM, `model.fusion.layers` blocks). Each is scored by `pretrain eval`'s own code:
dual-encoder retrieval R@1, `--rerank K` (fusion only) and `--binding`. The table puts the fusion run's
re-ranked R@1 next to both runs' plain R@1, and ITM binding accuracy next to both dual encoders'.

`frozen-towers` (after `contrastive` in `--recipes`): a second stage on the contrastive run's final weights
(`--init-from`), towers and logit scale frozen (`train.freeze`), a fresh fusion encoder with image positions
trained for `--frozen-steps` by ITM (both caption swaps of each sample as negatives at every step, and hard
negatives from the frozen towers' similarities, ramped in over 1,000 steps) and by the image-conditioned MLM
(30% of caption tokens masked, predicted through the fusion encoder). On whole images: no FLIP masking
(`objectives.mim.mask_ratio=0`), which would hide half the patches the match depends on, and no random crop
(`data.crop_scale=[1.0,1.0]`), which can cut an object out of a 32-pixel image. A constant learning rate
(`optim.schedule=constant`): matching an object swap is learned, if at all, after a long plateau at chance,
where a decaying rate would leave little step. For its first 6,000 steps the match loss is skewed toward
"left of" captions (`objectives.itm.skew_*`, weight 0.25 on the others): with both relations equally common
an object swap's match is a XOR that no single feature predicts, and it sat at chance for 9,000 steps on two
seeds' towers out of three; skewed, it is learned in about 1,500 (docs/benchmarks.md, "#20: a symmetry").
The skew alone left one seed of three at chance; with the conditioned MLM beside it, whose masked relation
word ("red circle [MASK] of blue square") is a first-order question about where the first-named object is,
all three learn it (docs/benchmarks.md, "#20: the conditioned MLM beside the skew"). Its dual encoder is the
contrastive run's, unchanged, so its re-ranked R@1 and ITM binding compare with the same towers'
dual-encoder scores: what the fusion encoder adds, and nothing else (BLIP-2's setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from pretrain.bench.overrides import owned_key_problems
from pretrain.bench.quality import train_ours

SMALL = ["model.vision.patch_size=8", "model.vision.width=64", "model.vision.layers=2",
         "model.vision.heads=4", "model.text.width=64", "model.text.layers=2", "model.text.heads=4",
         "model.text.context_length=16", "model.embed_dim=64", "data.vocab_size=256", "data.workers=1",
         "data.shuffle_buffer=500", "data.tokenizer_samples=4000", "objectives.mim.weight=0",
         "train.precision=fp32", "parallel.zero_stage=0", "optim.warmup_steps=20", "optim.lr=1e-3",
         "logging.every=20", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=100000"]
"""A recipe one CPU process trains in minutes (shared by both arms: only the objectives differ)."""
RECIPES: dict[str, list[str]] = {
    "contrastive": ["objectives.mlm.weight=0"],
    "fusion": ["model.fusion.layers=2", "model.fusion.heads=4", "objectives.itm.weight=1",
               "objectives.mlm.weight=0.5", "objectives.mlm.conditioned=true"],
    "frozen-towers": ["objectives.mlm.weight=1", "objectives.mlm.conditioned=true",
                      "objectives.mlm.mask_prob=0.3", "model.fusion.layers=2", "model.fusion.heads=4",
                      "model.fusion.image_positions=true", "objectives.itm.weight=1",
                      "objectives.itm.caption_negatives=true", "objectives.itm.caption_negatives_per_step=2",
                      "objectives.itm.hard_warmup_steps=1000",
                      "objectives.mim.mask_ratio=0", "data.crop_scale=[1.0,1.0]", "optim.schedule=constant",
                      "objectives.itm.skew_phrase=left of", "objectives.itm.skew_steps=6000",
                      "objectives.itm.skew_weight=0.25",
                      "train.freeze=[visual.*,text.*,logit_scale]", "parallel.zero_stage=1"],
}
STAGE_TWO = {"frozen-towers": "contrastive"}
"""Recipe -> the recipe whose final weights it starts from (same seed, earlier in `--recipes`)."""


def _data(out: Path, seed: int, train: int, val: int, size: int = 32) -> dict[str, str]:
    from data_pipelines.synth import write_synthetic_shards

    d = out / "data" / f"seed{seed}"
    tr = write_synthetic_shards(d / "train", train, 1000, size, seed=1000 + seed, compositional=True)
    va = write_synthetic_shards(d / "val", val, 1000, size, seed=2000 + seed, compositional=True)
    return {"train": tr["urls"], "val": va["urls"], "classnames": va["classnames"]}


def _score(run_dir: Path, data: dict[str, str], rerank: int) -> dict[str, Any]:
    from pretrain.evaluation.binding import binding_probe
    from pretrain.evaluation.evaluate import evaluate, load_model

    bundle = load_model(run_dir)
    fusion = bundle[0].itm_head is not None
    out = evaluate(run_dir, data["val"], data["classnames"], model_bundle=bundle,
                   rerank=rerank if fusion else 0)
    out.update(binding_probe(*bundle, data["val"]))
    return out


OWNED = {"model.image_size": "--image-size", "train.steps": "--steps", "train.micro_batch": "--batch-size",
         "train.seed": "--seeds", "data.train": None, "run.dir": None}
"""Keys the bench sets per run: a `--set` of one would win over the flag and desynchronise the report (e.g.
a model size other than the shards')."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    owned = owned_key_problems(args.set, OWNED)
    if owned:  # before any data is written
        raise ValueError("bench fusion: " + "; ".join(owned))
    for name, first in STAGE_TWO.items():
        if name in args.recipes and first not in args.recipes[:args.recipes.index(name)]:
            raise ValueError(f"bench fusion: recipe {name} starts from {first}'s weights: list {first} "
                             "before it in --recipes")
    out = Path(args.out).resolve()
    rows = []
    for seed in args.seeds:
        data = _data(out, seed, args.train_samples, args.val_samples, args.image_size)
        for name in args.recipes:
            run_dir = out / "runs" / f"seed{seed}" / name
            steps = args.steps
            init = []
            if name in STAGE_TWO:
                steps = args.frozen_steps or args.steps
                init = ["--init-from", str(out / "runs" / f"seed{seed}" / STAGE_TWO[name])]
            overrides = [*SMALL, f"model.image_size={args.image_size}", *RECIPES[name],
                         f"data.train={data['train']}", f"run.dir={run_dir}",
                         f"train.seed={seed}", f"train.steps={steps}",
                         f"train.micro_batch={args.batch_size}", *args.set]
            finished = run_dir / "summary.json"
            if getattr(args, "reuse_runs", False) and finished.exists():  # scored again, not retrained
                summary, wall = json.loads(finished.read_text()), None
            else:
                summary, wall = train_ours([*init, *overrides], run_dir)
            row = {"seed": seed, "recipe": name, "train_wall_s": None if wall is None else round(wall, 1),
                   "samples_per_s": summary.get("samples_per_s"), **_score(run_dir, data, args.rerank)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"rows": rows, "summary": summarize(rows)}


KEYS = ("i2t_r1", "t2i_r1", "i2t_rerank_r1", "t2i_rerank_r1", "i2t_rerank_sim_r1", "t2i_rerank_sim_r1",
        "i2t_rerank_candidates_recall",
        "binding_colours_contrastive", "binding_colours_itm", "binding_objects_contrastive",
        "binding_objects_itm", "binding_relation_mlm")


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """recipe -> metric -> 'mean ± std' over seeds."""
    out: dict[str, dict[str, str]] = {}
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        out[name] = {}
        for k in KEYS:
            vals = [r[k] for r in mine if r.get(k) is not None]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                out[name][k] = f"{statistics.mean(vals):.3f} ± {sd:.3f}"
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}` (commit {report['commit']}, {report['date']})", "",
             "| seed | recipe | i2t R@1 | t2i R@1 | i2t R@1 reranked: ITM / ITM + sim | "
             "t2i R@1 reranked: ITM / ITM + sim | pair in top K | binding colours: dual / ITM | "
             "binding objects: dual / ITM | relation word (MLM) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in report["rows"]:
        lines.append(f"| {r['seed']} | {r['recipe']} | {f(r['i2t_r1'])} | {f(r['t2i_r1'])} | "
                     f"{f(r.get('i2t_rerank_r1'))} / {f(r.get('i2t_rerank_sim_r1'))} | "
                     f"{f(r.get('t2i_rerank_r1'))} / {f(r.get('t2i_rerank_sim_r1'))} | "
                     f"{f(r.get('i2t_rerank_candidates_recall'))} | {f(r['binding_colours_contrastive'])} / "
                     f"{f(r.get('binding_colours_itm'))} | {f(r['binding_objects_contrastive'])} / "
                     f"{f(r.get('binding_objects_itm'))} | {f(r.get('binding_relation_mlm'))} |")
    lines += ["", "Mean ± std over seeds:", ""]
    for name, vals in report["summary"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in vals.items()))
    return "\n".join(lines) + "\n"


def cmd_fusion(args: argparse.Namespace) -> int:
    report = run(args)
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).resolve().parents[2]).stdout.strip() or "unknown"
    report["command"] = "pretrain " + " ".join(sys.argv[1:])
    report["date"] = str(datetime.date.today())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fusion.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def add_fusion_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("fusion", help="ITM re-ranking R@1 and the attribute-binding probe, fusion vs "
                         "contrastive-only, on compositional synthetic shards",
                         description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for data, runs and fusion.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--frozen-steps", type=int, default=0,
                   help="steps of the frozen-towers stage (default: --steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=8000)
    p.add_argument("--val-samples", type=int, default=500)
    p.add_argument("--rerank", type=int, default=8, help="K of --rerank")
    p.add_argument("--image-size", type=int, default=32, help="pixels per side of the shards and the model")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both recipes")
    p.add_argument("--reuse-runs", action="store_true",
                   help="a recipe whose run folder holds a finished run (summary.json) is scored, not "
                   "trained again: e.g. another frozen-towers stage over the same contrastive runs (its "
                   "row's train_wall_s is null)")
    p.set_defaults(func=cmd_fusion)
