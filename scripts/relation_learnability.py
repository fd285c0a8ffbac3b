"""Can a fusion encoder read a caption's spatial relation from a checkpoint's tokens at all? (#20's diagnosis)

    python scripts/relation_learnability.py RUN_DIR [--samples 20000] [--steps 3000] [--seed 0]

The binding probe's object swap ("blue square left of red circle" for "red circle left of blue square") and
`binding_relation_mlm` stay at chance after 10,000 steps of joint training. This separates two causes: the
towers' tokens do not hold what the relation needs, or the joint training gives the fusion encoder too
little signal to find it. A FRESH fusion encoder (the run's own fusion width and heads, 2 blocks) and a
2-way head are trained on the run's FROZEN towers to fill each caption's masked relation word ("left" /
"right") from the image: the image tokens `PretrainModel.image_tokens` gives, the bidirectional text pass
of the masked caption (what the conditioned MLM reads). Two arms from the same init: the image tokens as
they are, and with a learned position per image token added (`model.fusion.image_positions`). A third arm,
`mlm`, trains the fresh encoder with a fresh full-vocabulary MLM head on the conditioned MLM's own task (every
content word masked with probability `--mask-prob`, default the run's `objectives.mlm.mask_prob`) and is
scored on the same masked relation word: the relation is then one target among many, as in the joint run.
`mlm-residual` (not in the default arms): the same, with the fused head's logits added to a text-only head's
(a product of experts), so the words the caption alone predicts stop pulling on the fusion path.
`itm-objects` (not in the default arms): ITM with the object swap as every image's negative at every step
(the causal text pass, as ITM reads it), scored as the binding probe scores the object swap;
`itm-objects-positions` the same with fresh learned image positions.
`itm-mixed-positions`: the pairs the frozen-towers stage scores (`pretrain bench fusion`), five per image and
step: the true caption, both swaps, another sample's caption and another sample's image (uniform over the
batch); `--mixed-steps N` gives `itm-objects-positions` those pairs for its first N steps only. ITM rows also
report `colours` (true above the colour swap).
Fresh two-object samples (train seed 1000, held-out seed 2000), AdamW lr 1e-3, batch 64. Prints one JSON line
per evaluation: arm, step, training loss, held-out accuracy (chance 0.5).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines.synth import make_pair_sample
from data_pipelines.transforms import normalize_batch
from pretrain.evaluation.binding import relation_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from itm_pairs import (  # noqa: E402,F401 (re-exported: the ITM loop's names, for its callers and tests)
    MIXED,
    itm_optimizer,
    sincos_2d,
    swap_data,
    train_itm_pairs,
)


@torch.no_grad()
def relation_data(model: Any, tokenizer: Any, cfg: Any, n: int, seed: int, batch: int = 256
                  ) -> dict[str, torch.Tensor]:
    """n fresh samples -> `ids` [n, L] (the captions), `text` [n, L, W_text] (the states of the caption with
    its relation word masked), `pad` [n, L], `pos` [n] (where the relation word was), `image` [n, 1 + N,
    W_img] and `label` [n] (1 = "right")."""
    L = cfg.model.text.context_length
    rel = relation_ids(tokenizer, L)
    if rel is None:
        raise ValueError("the run's tokenizer splits 'left' or 'right' into several tokens")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "text", "pad", "pos", "image", "label")}
    for start in range(0, n, batch):
        samples = [make_pair_sample(i, cfg.model.image_size, seed)
                   for i in range(start, min(start + batch, n))]
        pixels = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
        ids = tokenizer.encode_batch([s["txt"].decode() for s in samples], L)
        out["ids"].append(ids.clone())
        pos = ((ids == rel[0]) | (ids == rel[1])).float().argmax(dim=1)  # [b]: every caption has one
        rows = torch.arange(len(ids))
        out["label"].append((ids[rows, pos] == rel[1]).long())
        ids[rows, pos] = tokenizer.mask_id
        out["text"].append(model.text.forward_tokens(ids, causal=False).float())
        out["pad"].append(model.text.padding_mask(ids))
        out["pos"].append(pos)
        x = normalize_batch(pixels, tuple(cfg.data.mean), tuple(cfg.data.std))
        out["image"].append(model.image_tokens(x).float())
    return {k: torch.cat(v) for k, v in out.items()}


def train_arm(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], width: int, heads: int,
              positions: bool, steps: int, seed: int, every: int = 250) -> list[dict[str, Any]]:
    """Train a fresh fusion encoder + head on `train`, held-out accuracy on `test` every `every` steps."""
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(seed)
    S, W_img = train["image"].shape[1:]
    enc = FusionEncoder(train["text"].shape[-1], W_img, width, 2, heads, image_tokens=S if positions else 0)
    enc.init_weights()
    head = torch.nn.Linear(width, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    identity = torch.arange(S - 1).expand(1, S - 1)

    def logits(d: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        image = enc.place(d["image"][idx], identity.expand(len(idx), -1))
        fused = enc(d["text"][idx], image, d["pad"][idx])  # [b, L, W]
        return head(fused[torch.arange(len(idx)), d["pos"][idx]])

    rows, gen = [], torch.Generator().manual_seed(seed)
    for step in range(steps + 1):
        idx = torch.randint(0, len(train["label"]), (64,), generator=gen)
        loss = F.cross_entropy(logits(train, idx), train["label"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                pred = logits(test, torch.arange(len(test["label"]))).argmax(dim=1)
                acc = (pred == test["label"]).float().mean()
            rows.append({"arm": "positions" if positions else "as-is", "step": step,
                         "loss": round(loss.item(), 4), "accuracy": round(float(acc), 4)})
    return rows


def train_itm_arm(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], width: int, heads: int,
                  steps: int, seed: int, positions: bool = False, every: int = 250, mixed_steps: int = 0,
                  name: str | None = None) -> list[dict[str, Any]]:
    """The `itm-objects` arm: a fresh fusion encoder and match head learn true caption (match) vs its object
    swap (no match) for every image of every step -- the object swap as ITM's only negative, every step --
    scored by held-out pairwise accuracy (true above swap, chance 0.5), the binding probe's measure.
    `positions` (`itm-objects-positions`): with fresh learned image positions, as `positions` does.
    `mixed_steps`: steps before this one score the stage's five pairs per image (true, both swaps, a batch
    caption, a batch image: 1 match, 4 no match). `train_itm_pairs` does the training."""
    name = name or ("itm-objects-positions" if positions else "itm-objects")
    rows = train_itm_pairs(train, test, width, heads, steps, seed, positions=positions,
                           mixed=lambda step: step < mixed_steps, every=every)
    return [{"arm": name, "step": r["step"], "loss": r["loss"], "accuracy": r["objects"],
             "colours": r["colours"]} for r in rows]


def train_mlm_arm(model: Any, tokenizer: Any, train: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
                  width: int, heads: int, mask_prob: float, steps: int, seed: int, every: int = 250,
                  residual: bool = False) -> list[dict[str, Any]]:
    """The `mlm` arm: a fresh fusion encoder and full-vocabulary head learn to fill every masked content word
    (probability `mask_prob` each, all replaced by the mask token), scored on the relation word alone."""
    from pretrain.evaluation.binding import relation_ids
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(seed)
    left, right = relation_ids(tokenizer, train["ids"].shape[1])
    enc = FusionEncoder(train["text"].shape[-1], train["image"].shape[-1], width, 2, heads)
    enc.init_weights()
    head = torch.nn.Linear(width, tokenizer.vocab_size)
    text_head = torch.nn.Linear(train["text"].shape[-1], tokenizer.vocab_size) if residual else None
    params = [*enc.parameters(), *head.parameters(), *(text_head.parameters() if residual else [])]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    L = train["ids"].shape[1]
    rows, gen = [], torch.Generator().manual_seed(seed)
    for step in range(steps + 1):
        idx = torch.randint(0, len(train["ids"]), (64,), generator=gen)
        ids = train["ids"][idx]
        eos = (ids == tokenizer.eos_id).float().argmax(dim=1)
        content = (torch.arange(L)[None] >= 1) & (torch.arange(L)[None] < eos[:, None])  # [b, L]
        picked = (torch.rand(ids.shape, generator=gen) < mask_prob) & content
        picked[torch.arange(len(ids)), (torch.rand(len(ids), generator=gen) * (eos - 1)).long() + 1] |= \
            ~picked.any(dim=1)  # at least one target per caption, as the data pipeline's masking does
        masked = ids.masked_fill(picked, tokenizer.mask_id)
        with torch.no_grad():
            text = model.text.forward_tokens(masked, causal=False).float()
        fused = enc(text, train["image"][idx], model.text.padding_mask(masked))  # [b, L, W]
        logits = head(fused[picked])  # [n, V]
        if text_head is not None:  # residual: the image path adds to what the caption alone predicts
            logits = logits + text_head(text[picked])
        loss = F.cross_entropy(logits, ids[picked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                r = torch.arange(len(test["label"]))
                logits = head(enc(test["text"], test["image"], test["pad"])[r, test["pos"]])  # [n, V]
                if text_head is not None:
                    logits = logits + text_head(test["text"][r, test["pos"]])
                acc = ((logits[:, right] > logits[:, left]).long() == test["label"]).float().mean()
            rows.append({"arm": "mlm-residual" if residual else "mlm", "step": step,
                         "loss": round(loss.item(), 4), "accuracy": round(float(acc), 4)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run directory or any checkpoint `pretrain eval` reads")
    p.add_argument("--samples", type=int, default=20000, help="training samples (held out: 400)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-prob", type=float, help="the mlm arm's masking (default: the run's own)")
    p.add_argument("--arms", nargs="+", default=["as-is", "positions", "mlm"],
                   choices=["as-is", "positions", "mlm", "mlm-residual", "itm-objects",
                            "itm-objects-positions", "itm-mixed-positions"])
    p.add_argument("--mixed-steps", type=int, default=0,
                   help="itm-objects(-positions): the stage's five pairs per image for the first N steps")
    args = p.parse_args()
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(args.run_dir)
    model.eval()
    if any(not a.startswith("itm") for a in args.arms):
        train = relation_data(model, tokenizer, cfg, args.samples, 1000)
        test = relation_data(model, tokenizer, cfg, 400, 2000)
    if any(a.startswith("itm") for a in args.arms):
        swaps = (swap_data(model, tokenizer, cfg, args.samples, 1000),
                 swap_data(model, tokenizer, cfg, 400, 2000))
    width = cfg.model.fusion.width or cfg.model.text.width
    for arm in args.arms:
        if arm.startswith("itm"):
            mixed = arm == "itm-mixed-positions"
            rows = train_itm_arm(*swaps, width, cfg.model.fusion.heads, args.steps, args.seed,
                                 positions=arm != "itm-objects", name=arm,
                                 mixed_steps=args.steps + 1 if mixed else args.mixed_steps)
        elif arm.startswith("mlm"):
            rows = train_mlm_arm(model, tokenizer, train, test, width, cfg.model.fusion.heads,
                                 args.mask_prob or cfg.objectives.mlm.mask_prob, args.steps, args.seed,
                                 residual=arm == "mlm-residual")
        else:
            rows = train_arm(train, test, width, cfg.model.fusion.heads, arm == "positions", args.steps,
                             args.seed)
        for row in rows:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
