"""Which ITM pairs let a fusion encoder learn the object swap? (#20's diagnosis of the frozen-towers stage)

    python scripts/itm_pair_mix.py RUN_DIR [--kinds objects] [--mixed] [--mixed-until N] [--mixed-from N]
        [--optim script|stage] [--batch 64] [--weights objects=4,...] [--logit-penalty L]
        [--position-std S] [--freeze-positions] [--train-towers [--tower-lr M]] [--layers 2] [--width W]
        [--heads H] [--lr 1e-3] [--seed 0] [--steps 5000]

`scripts/relation_learnability.py --arms itm-objects-positions` learns the object swap ("blue square left
of red circle" for "red circle left of blue square") on a contrastive run's frozen towers; the frozen-towers
stage of `pretrain bench fusion`, on the same towers, does not. This script trains the same fresh fusion
encoder (2 blocks, fresh learned image positions) and 2-way match head on the towers' tokens of fresh
two-object samples with a chosen set of no-match pairs per image and step, besides its true caption (match):
`objects` (its object swap), `colours` (its colour swap), `batch-caption` (another sample's caption),
`batch-image` (another sample's image), so each difference between the two can be switched alone:
- `--kinds` the pairs; `--mixed` all four (the stage's five pairs), `--mixed-until N` / `--mixed-from N`
  all four before step N / from step N on (else `--kinds`);
- `--optim stage`: the stage's AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.05 on matrices, clip 1.0)
  instead of the script's (defaults, no weight decay);
- `--weights`: per-kind loss weights (`positive=4,objects=4`); `--logit-penalty L`: + L x mean squared match
  margin (spectral decoupling, against gradient starvation);
- `--position-std S`: image positions drawn N(0, S^2) instead of N(0, 1/W); `--position-init sincos`: MAE's
  fixed 2D sine-cosine table instead (times S if given); `--freeze-positions`: not trained;
  `--text-positions`: fresh learned positions on the caption side too (`model.fusion.text_positions`);
- `--text-from RUN`: the captions' states from another run's text tower (and tokenizer), the images' from
  RUN_DIR's: which tower, image or text, keeps the fresh encoder from the object swap;
- `--train-towers`: RUN_DIR's towers train with the fusion encoder (learning rate x `--tower-lr`, default
  0.1), so its tokens can change for the match: do towers that do not allow the object swap frozen allow it
  trained (ALBEF and BLIP train theirs)?
- `--layers`, `--width`, `--heads`, `--lr`: the fresh encoder's size (default 2 blocks, the run's fusion width
  or else its text width, the run's fusion heads) and learning rate; `--seed` its initialisation and batches;
- `--one-relation-until N [--left-share P]`: before step N, only samples whose caption says "left of" (P < 1:
  a share P of them, the rest "right of"; the match then hangs on
  one feature, where the first-named object is; with both relations it is that feature XOR the relation
  word, which no single feature predicts at first); rows add `objects_left` / `objects_right`.
  `--right-weight W`: every sample drawn as usual, the pairs of "right of" captions weighted W in the loss.
Prints one JSON line per 250 steps: held-out pairwise accuracy of the true caption over its object swap
(`objects`) and over its colour swap (`colours`), chance 0.5. Results: docs/benchmarks.md, "#20: which pairs".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from itm_pairs import MIXED, swap_data, train_itm_pairs  # noqa: E402

from pretrain.evaluation.binding import relation_ids  # noqa: E402

KINDS = MIXED
"""The no-match pair kinds `--kinds` may name (all four: `--mixed`)."""


def weights_problem(text: str) -> str | None:
    """Why `--weights` cannot be read (None: it can): items KIND=NUMBER, KIND `positive` or one of KINDS."""
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("positive", *KINDS):
            return f"--weights: {item!r} is not KIND=NUMBER with KIND in {('positive', *KINDS)}"
        try:
            float(value)
        except ValueError:
            return f"--weights: {item!r}: {value!r} is not a number"
    return None


def train(train_set: dict[str, torch.Tensor], test: dict[str, torch.Tensor], width: int, heads: int,
          args: argparse.Namespace, every: int = 250, towers: Any = None,
          relation: torch.Tensor | None = None, test_relation: torch.Tensor | None = None
          ) -> list[dict[str, Any]]:
    """`itm_pairs.train_itm_pairs` as the flags say; prints and returns a row every `every` steps.
    The batch-negative partner is drawn at every step, the random stream these rows were measured with.
    `relation` / `test_relation`: per row, 1 where the true caption says "right of"
    (`--one-relation-until`)."""
    left = None if relation is None else torch.nonzero(relation == 0).flatten()
    if left is not None and args.left_share < 1.0:  # + the first right-of rows that make the share
        right = torch.nonzero(relation == 1).flatten()
        k = round(len(left) * (1 - args.left_share) / args.left_share)
        left = torch.cat([left, right[:k]])
    groups = None if test_relation is None else {"left": test_relation == 0, "right": test_relation == 1}
    weights = {"positive": 1.0, **dict.fromkeys(KINDS, 1.0)}
    for item in filter(None, args.weights.split(",")):
        key, value = item.split("=")
        weights[key] = float(value)
    return train_itm_pairs(
        train_set, test, width, heads, args.steps, args.seed, batch=args.batch,
        kinds=tuple(args.kinds.split(",")),
        mixed=lambda step: args.mixed or step < args.mixed_until or step >= args.mixed_from,
        draw_every_step=True, optim=args.optim, weights=weights, logit_penalty=args.logit_penalty,
        position_std=args.position_std, position_init=args.position_init,
        freeze_positions=args.freeze_positions,
        text_positions=args.text_positions, towers=towers, tower_lr=args.tower_lr,
        layers=args.layers, lr=args.lr, every=every, test_groups=groups,
        row_weight=None if relation is None or args.right_weight == 1.0 else
        torch.where(relation == 1, args.right_weight, 1.0),
        draw_from=None if left is None else (lambda step: left if step < args.one_relation_until else None),
        on_row=lambda row: print(json.dumps(row), flush=True))


def with_captions_of(data: dict[str, torch.Tensor], run_dir: str, n: int, seed: int
                     ) -> dict[str, torch.Tensor]:
    """`data` (swap_data of n samples drawn with `seed`) with every caption key replaced by what `run_dir`'s
    text tower and tokenizer make of the same samples' captions; the image tokens stay."""
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(run_dir)
    model.eval()
    other = swap_data(model, tokenizer, cfg, n, seed)
    return {**other, "image": data["image"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run directory or any checkpoint `pretrain eval` reads")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--samples", type=int, default=20000, help="training samples (held out: 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kinds", default="objects", help=f"comma-separated no-match pairs of {KINDS}")
    p.add_argument("--mixed", action="store_true", help="all four kinds at every step")
    p.add_argument("--mixed-until", type=int, default=-1, help="all four kinds before this step")
    p.add_argument("--mixed-from", type=int, default=10**9, help="all four kinds from this step on")
    p.add_argument("--optim", default="script", choices=["script", "stage"])
    p.add_argument("--weights", default="", help="per-kind loss weights, e.g. positive=4,objects=4")
    p.add_argument("--logit-penalty", type=float, default=0.0)
    p.add_argument("--position-std", type=float, default=0.0)
    p.add_argument("--position-init", default="normal", choices=["normal", "sincos"])
    p.add_argument("--freeze-positions", action="store_true")
    p.add_argument("--text-positions", action="store_true")
    p.add_argument("--text-from", help="a run whose text tower (and tokenizer) encodes the captions")
    p.add_argument("--train-towers", action="store_true", help="train RUN_DIR's towers with the fusion one")
    p.add_argument("--tower-lr", type=float, default=0.1, help="--train-towers: their lr multiplier")
    p.add_argument("--layers", type=int, default=2, help="fusion blocks")
    p.add_argument("--width", type=int, help="fusion width (default: the run's fusion or text width)")
    p.add_argument("--heads", type=int, help="fusion heads (default: the run's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--one-relation-until", type=int, default=0,
                   help="before this step only samples whose caption says 'left of' (rows split by relation)")
    p.add_argument("--right-weight", type=float, default=1.0,
                   help="the loss weight of 'right of' captions' pairs at every step (1: plain mean)")
    p.add_argument("--left-share", type=float, default=1.0,
                   help="--one-relation-until: the share of 'left of' captions before it (else all)")
    args = p.parse_args()
    if not 0 < args.left_share <= 1:
        p.error(f"--left-share: {args.left_share} is not a share in (0, 1]")
    if args.right_weight < 0:
        p.error(f"--right-weight: {args.right_weight} is negative")
    if args.train_towers and args.text_from:
        p.error("--train-towers trains RUN_DIR's towers; --text-from reads another run's: choose one")
    unknown = [k for k in args.kinds.split(",") if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose from {KINDS}")
    problem = weights_problem(args.weights)
    if problem:
        p.error(problem)
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(args.run_dir)
    model.eval()
    train_set = swap_data(model, tokenizer, cfg, args.samples, 1000)
    test = swap_data(model, tokenizer, cfg, 400, 2000)
    if args.text_from:
        train_set, test = (with_captions_of(d, args.text_from, n, seed)
                           for d, n, seed in ((train_set, args.samples, 1000), (test, 400, 2000)))
    towers = None
    if args.train_towers:
        towers = model.requires_grad_(True)  # eval mode stays: no masking, no dropout
    relation = test_relation = None
    if args.one_relation_until or args.right_weight != 1.0:
        left_id, right_id = relation_ids(tokenizer, cfg.model.text.context_length)
        relation, test_relation = ((d["true_ids"] == right_id).any(dim=1).long() for d in (train_set, test))
    train(train_set, test, args.width or cfg.model.fusion.width or cfg.model.text.width,
          args.heads or cfg.model.fusion.heads, args, towers=towers, relation=relation,
          test_relation=test_relation)


if __name__ == "__main__":
    main()
