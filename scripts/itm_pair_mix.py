"""Which ITM pairs let a fusion encoder learn the object swap? (#20's diagnosis of the frozen-towers stage)

    python scripts/itm_pair_mix.py RUN_DIR [--kinds objects] [--mixed] [--mixed-until N] [--mixed-from N]
        [--optim script|stage] [--batch 64] [--weights objects=4,...] [--logit-penalty L]
        [--position-std S] [--freeze-positions] [--steps 5000]

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
- `--position-std S`: image positions drawn N(0, S^2) instead of N(0, 1/W); `--freeze-positions`: not trained;
  `--text-positions`: fresh learned positions on the caption side too (`model.fusion.text_positions`);
- `--text-from RUN`: the captions' states from another run's text tower (and tokenizer), the images' from
  RUN_DIR's: which tower, image or text, keeps the fresh encoder from the object swap.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relation_learnability import swap_data  # noqa: E402

KINDS = ("objects", "colours", "batch-caption", "batch-image")
CAPTION = {"objects": "swap", "colours": "colour"}  # kind -> swap_data's caption key


def optimizer(named: list[tuple[str, torch.Tensor]], kind: str) -> tuple[torch.optim.Optimizer, float | None]:
    """(AdamW, gradient clip): the learnability script's (`script`) or the frozen-towers stage's (`stage`)."""
    params = [q for _, q in named]
    if kind == "script":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), None
    decay = [q for n, q in named if q.ndim >= 2 and "embedding" not in n]
    rest = [q for n, q in named if not (q.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6), 1.0


def train(train_set: dict[str, torch.Tensor], test: dict[str, torch.Tensor], width: int, heads: int,
          args: argparse.Namespace, every: int = 250) -> list[dict[str, Any]]:
    """Train the fresh encoder and head as `args` says; a row (step, loss, accuracies) every `every` steps."""
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(args.seed)
    S, W_img = train_set["image"].shape[1:]
    L = train_set["true"].shape[1] if args.text_positions else 0
    enc = FusionEncoder(train_set["true"].shape[-1], W_img, width, 2, heads, context_length=L, image_tokens=S)
    enc.init_weights()
    if args.position_std:
        torch.nn.init.normal_(enc.image_pos.embedding, std=args.position_std)
    head = torch.nn.Linear(width, 2)
    if args.freeze_positions:
        enc.image_pos.embedding.requires_grad_(False)
    identity = torch.arange(S - 1).expand(1, S - 1)
    named = [(f"enc.{n}", q) for n, q in enc.named_parameters() if q.requires_grad]
    named += [(f"head.{n}", q) for n, q in head.named_parameters()]
    opt, clip = optimizer(named, args.optim)
    weight = {"positive": 1.0, **dict.fromkeys(KINDS, 1.0)}
    for item in filter(None, args.weights.split(",")):
        key, value = item.split("=")
        weight[key] = float(value)

    def match(d: dict[str, torch.Tensor], idx: torch.Tensor, caption: str,
              images: torch.Tensor | None = None) -> torch.Tensor:
        """Match logits [b, 2] of captions `caption` of rows idx with the images of rows `images` (idx)."""
        image = enc.place(d["image"][idx if images is None else images], identity.expand(len(idx), -1))
        fused = enc(d[caption][idx], image, d[f"{caption}_pad"][idx])  # [b, L, W]
        return head(fused[torch.arange(len(idx)), d[f"{caption}_pos"][idx]])

    rows, gen, B = [], torch.Generator().manual_seed(args.seed), args.batch
    for step in range(args.steps + 1):
        idx = torch.randint(0, len(train_set["image"]), (B,), generator=gen)
        mixed = args.mixed or step < args.mixed_until or step >= args.mixed_from
        kinds = KINDS if mixed else args.kinds.split(",")
        other = idx[(torch.arange(B) + torch.randint(1, B, (1,), generator=gen)) % B]  # never the row itself
        pairs, weights = [match(train_set, idx, "true")], [weight["positive"]]
        for kind in kinds:
            if kind in CAPTION:
                pairs.append(match(train_set, idx, CAPTION[kind]))
            elif kind == "batch-caption":
                pairs.append(match(train_set, other, "true", images=idx))
            else:
                pairs.append(match(train_set, idx, "true", images=other))
            weights.append(weight[kind])
        logits = torch.cat(pairs)  # [(1 + kinds) B, 2]
        labels = torch.cat([torch.ones(B), torch.zeros(len(logits) - B)]).long()
        w = torch.tensor(weights).repeat_interleave(B)
        loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum()
        if args.logit_penalty:
            loss = loss + args.logit_penalty * (logits[:, 1] - logits[:, 0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([q for _, q in named], clip)
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                r = torch.arange(len(test["image"]))
                t, s, c = (match(test, r, k) for k in ("true", "swap", "colour"))
                row = {"step": step, "loss": round(loss.item(), 4),
                       "objects": round(float(((t[:, 1] - t[:, 0]) > (s[:, 1] - s[:, 0])).float().mean()), 4),
                       "colours": round(float(((t[:, 1] - t[:, 0]) > (c[:, 1] - c[:, 0])).float().mean()), 4)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


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
    p.add_argument("--freeze-positions", action="store_true")
    p.add_argument("--text-positions", action="store_true")
    p.add_argument("--text-from", help="a run whose text tower (and tokenizer) encodes the captions")
    args = p.parse_args()
    unknown = [k for k in args.kinds.split(",") if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose from {KINDS}")
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(args.run_dir)
    model.eval()
    train_set = swap_data(model, tokenizer, cfg, args.samples, 1000)
    test = swap_data(model, tokenizer, cfg, 400, 2000)
    if args.text_from:
        train_set, test = (with_captions_of(d, args.text_from, n, seed)
                           for d, n, seed in ((train_set, args.samples, 1000), (test, 400, 2000)))
    train(train_set, test, cfg.model.fusion.width or cfg.model.text.width, cfg.model.fusion.heads, args)


if __name__ == "__main__":
    main()
