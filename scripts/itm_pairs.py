"""ITM pair training on a run's frozen (or training) towers: the loop `scripts/relation_learnability.py`'s
`itm-*` arms and `scripts/itm_pair_mix.py` share (#20's diagnosis of the object swap).

`swap_data` encodes fresh two-object samples and both of each caption's swaps once; `train_itm_pairs` trains a
fresh fusion encoder and 2-way match head on them with a chosen set of no-match pairs per image, and scores
held-out pairwise accuracy (true caption over its object swap / colour swap, chance 0.5).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines.synth import make_pair_sample
from data_pipelines.transforms import normalize_batch


@torch.no_grad()
def swap_data(model: Any, tokenizer: Any, cfg: Any, n: int, seed: int, batch: int = 256
              ) -> dict[str, torch.Tensor]:
    """n fresh samples -> for the true caption, its object swap ("blue square left of red circle" for "red
    circle left of blue square") and its colour swap ("blue circle left of red square"): the causal pass's
    states `true` / `swap` / `colour` [n, L, W_text] (what ITM's fusion encoder reads), padding masks
    `true_pad` / `swap_pad` / `colour_pad` [n, L] and pool positions `true_pos` / ... [n]; `image`
    [n, 1 + N, W_img]; and what the towers read, for a loop that trains them: `true_ids` / ... [n, L] and
    `pixels` [n, 3, S, S] (normalised)."""
    L = cfg.model.text.context_length
    out: dict[str, list[torch.Tensor]] = {f"{name}{part}": [] for name in ("true", "swap", "colour")
                                          for part in ("", "_pad", "_pos", "_ids")}
    out["image"], out["pixels"] = [], []
    for start in range(0, n, batch):
        samples = [make_pair_sample(i, cfg.model.image_size, seed)
                   for i in range(start, min(start + batch, n))]
        captions = {"true": [s["txt"].decode() for s in samples],
                    "swap": [json.loads(s["json"])["swapped_objects"] for s in samples],
                    "colour": [json.loads(s["json"])["swapped_colours"] for s in samples]}
        for name, texts in captions.items():
            ids = tokenizer.encode_batch(texts, L)
            out[name].append(model.text_tokens(ids).float())
            out[f"{name}_ids"].append(ids)
            out[f"{name}_pad"].append(model.text.padding_mask(ids))
            out[f"{name}_pos"].append(model.text.pool_positions(ids))
        pixels = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
        x = normalize_batch(pixels, tuple(cfg.data.mean), tuple(cfg.data.std))
        out["image"].append(model.image_tokens(x).float())
        out["pixels"].append(x.float())
    return {k: torch.cat(v) for k, v in out.items()}


MIXED = ("objects", "colours", "batch-caption", "batch-image")
"""The no-match pairs the frozen-towers stage scores per image besides the true caption (match)."""
_CAPTION = {"objects": "swap", "colours": "colour"}  # pair kind -> swap_data's caption key


def itm_optimizer(named: list[tuple[str, torch.Tensor]], kind: str, tower_lr: float = 1.0,
                  lr: float = 1e-3) -> tuple[torch.optim.Optimizer, float | None]:
    """(AdamW, gradient clip): this script's (`script`: defaults, no weight decay) or the frozen-towers
    stage's (`stage`: betas 0.9/0.98, eps 1e-6, weight decay 0.05 on matrices, clip 1.0). Parameters named
    `towers.*` take the learning rate `lr` x `tower_lr` (`optim.lr_mult`'s role in the stage)."""
    groups = []
    for tower in (False, True):
        mine = [(n, q) for n, q in named if n.startswith("towers.") == tower]
        rate = lr * (tower_lr if tower else 1.0)
        if not mine:
            continue
        if kind == "script":
            groups.append({"params": [q for _, q in mine], "lr": rate, "weight_decay": 0.0})
            continue
        decay = [q for n, q in mine if q.ndim >= 2 and "embedding" not in n]
        rest = [q for n, q in mine if not (q.ndim >= 2 and "embedding" not in n)]
        groups += [{"params": decay, "lr": rate, "weight_decay": 0.05},
                   {"params": rest, "lr": rate, "weight_decay": 0.0}]
    if kind == "script":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6), 1.0


def sincos_2d(patches: int, width: int) -> torch.Tensor:
    """MAE's fixed 2D sine-cosine position table [1 + patches, width] for a square grid (CLS row zeros):
    half the channels encode the column, half the row, each as sines and cosines over geometric
    frequencies, so a patch's side is a linear feature of its position from the first step."""
    side = int(round(patches ** 0.5))
    if side * side != patches or width % 4:
        raise ValueError(f"sincos_2d: {patches} patches is not a square grid, or width {width} % 4 != 0")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # [W/4]
    row, col = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [side, side]

    def axis(coord: torch.Tensor) -> torch.Tensor:
        angle = coord.reshape(-1, 1).double() * freqs  # [N, W/4]
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # [N, W/2]

    table = torch.cat([axis(col), axis(row)], dim=1).float()  # [N, W]
    return torch.cat([torch.zeros(1, width), table])


def train_itm_pairs(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], width: int, heads: int,
                    steps: int, seed: int, *, batch: int = 64, positions: bool = True,
                    kinds: tuple[str, ...] = ("objects",), mixed: Callable[[int], bool] = lambda step: False,
                    draw_every_step: bool = False, optim: str = "script",
                    weights: dict[str, float] | None = None, logit_penalty: float = 0.0,
                    position_std: float = 0.0, position_init: str = "normal", freeze_positions: bool = False,
                    text_positions: bool = False, towers: Any = None, tower_lr: float = 1.0,
                    layers: int = 2, lr: float = 1e-3,
                    draw_from: Callable[[int], torch.Tensor | None] | None = None,
                    row_weight: torch.Tensor | None = None,
                    test_groups: dict[str, torch.Tensor] | None = None, every: int = 250,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """A fresh fusion encoder (`layers` blocks, `width`, `heads`) and 2-way match head, AdamW at `lr`, on
    frozen towers' tokens (`swap_data`): per
    image and step the true caption (match) and one no-match pair per kind in `kinds` (`MIXED` at steps
    where `mixed(step)`): `objects` / `colours` its object / colour swap, `batch-caption` another sample's
    caption, `batch-image` another sample's image. `positions`: fresh learned image positions (drawn
    N(0, position_std^2) when given, or with `position_init="sincos"` MAE's fixed 2D sine-cosine table
    times `position_std` or 1, CLS row 0; not trained with `freeze_positions`); `text_positions`: fresh
    caption-side ones too. `towers`: a model whose towers train with the fusion encoder (learning rate x
    `tower_lr`): the tokens come from `pixels` and `*_ids` through them at every step, not from the cached
    states (`swap_data` holds both; the towers are used in eval mode: no masking, no dropout). `weights`
    (per kind and `positive`): a weighted mean over pairs (None: the plain mean); `logit_penalty`: + that
    times the mean squared match margin. The batch-negative partner is drawn at mixed steps only, or at
    every step with `draw_every_step` (the random stream that
    `scripts/itm_pair_mix.py`'s rows were measured with). `draw_from(step)`: the training rows a step draws
    its batch from (None: all); `row_weight` [n_train]: each pair's loss weight times its sample's (a
    weighted mean; what `objectives.itm.skew_*` does in the stage); `test_groups`: name -> held-out row
    mask, each reported as `objects_<name>`.
    Rows every `every` steps and at the last: step,
    loss, held-out pairwise accuracy over the object swap (`objects`) and the colour swap (`colours`)."""
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(seed)
    S, W_img = train["image"].shape[1:]
    L = train["true"].shape[1] if text_positions else 0
    enc = FusionEncoder(train["true"].shape[-1], W_img, width, layers, heads, context_length=L,
                        image_tokens=S if positions else 0)
    enc.init_weights()
    if position_init == "sincos":
        with torch.no_grad():
            enc.image_pos.embedding.copy_(sincos_2d(S - 1, W_img) * (position_std or 1.0))
    elif position_std:
        torch.nn.init.normal_(enc.image_pos.embedding, std=position_std)
    identity = torch.arange(S - 1).expand(1, S - 1)
    head = torch.nn.Linear(width, 2)
    if freeze_positions:
        enc.image_pos.embedding.requires_grad_(False)
    named = [(f"enc.{n}", q) for n, q in enc.named_parameters() if q.requires_grad]
    named += [(f"head.{n}", q) for n, q in head.named_parameters()]
    if towers is not None:
        named += [(f"towers.{n}", q) for n, q in towers.named_parameters()
                  if n.startswith(("visual.", "text.")) and q.requires_grad]
    opt, clip = itm_optimizer(named, optim, tower_lr, lr)

    def tokens(d: dict[str, torch.Tensor], key: str, rows: torch.Tensor) -> torch.Tensor:
        """The cached states of `key` (a caption kind or `image`) for `rows`, or the training towers' own."""
        if towers is None:
            return d[key][rows]
        if key == "image":
            return towers.visual.forward_features(d["pixels"][rows])[1]  # [b, 1 + N, W_img], every patch
        return towers.text(d[f"{key}_ids"][rows], causal=True, return_tokens=True)  # [b, L, W_text]

    def match(d: dict[str, torch.Tensor], idx: torch.Tensor, caption: str,
              images: torch.Tensor | None = None) -> torch.Tensor:
        """Match logits [b, 2] of captions `caption` of rows idx with the images of rows `images` (idx)."""
        image = tokens(d, "image", idx if images is None else images)
        image = enc.place(image, identity.expand(len(idx), -1))
        fused = enc(tokens(d, caption, idx), image, d[f"{caption}_pad"][idx])  # [b, L, W]
        return head(fused[torch.arange(len(idx)), d[f"{caption}_pos"][idx]])  # [b, 2]

    rows, gen, B = [], torch.Generator().manual_seed(seed), batch
    for step in range(steps + 1):
        pool = draw_from(step) if draw_from is not None else None
        if pool is None:
            idx = torch.randint(0, len(train["image"]), (B,), generator=gen)
        else:
            idx = pool[torch.randint(0, len(pool), (B,), generator=gen)]
        now = MIXED if mixed(step) else kinds
        other = None
        if draw_every_step or any(k.startswith("batch") for k in now):  # never the row itself
            other = idx[(torch.arange(B) + torch.randint(1, B, (1,), generator=gen)) % B]
        pairs, w = [match(train, idx, "true")], [(weights or {}).get("positive", 1.0)]
        for kind in now:
            if kind in _CAPTION:
                pairs.append(match(train, idx, _CAPTION[kind]))
            elif kind == "batch-caption":
                pairs.append(match(train, other, "true", images=idx))
            else:
                pairs.append(match(train, idx, "true", images=other))
            w.append((weights or {}).get(kind, 1.0))
        logits = torch.cat(pairs)  # [(1 + kinds) B, 2]
        labels = torch.cat([torch.ones(B), torch.zeros(len(logits) - B)]).long()
        if weights is None and row_weight is None:
            loss = F.cross_entropy(logits, labels)
        else:
            per = torch.tensor(w).repeat_interleave(B)
            if row_weight is not None:
                per = per * row_weight[idx].repeat(len(pairs))
            loss = (F.cross_entropy(logits, labels, reduction="none") * per).sum() / per.sum()
        if logit_penalty:
            loss = loss + logit_penalty * (logits[:, 1] - logits[:, 0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([q for _, q in named], clip)
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                r = torch.arange(len(test["image"]))
                t, sw, c = (match(test, r, k) for k in ("true", "swap", "colour"))
                margin = t[:, 1] - t[:, 0]
                row = {"step": step, "loss": round(loss.item(), 4),
                       "objects": round(float((margin > sw[:, 1] - sw[:, 0]).float().mean()), 4),
                       "colours": round(float((margin > c[:, 1] - c[:, 0]).float().mean()), 4)}
                for name, mask in (test_groups or {}).items():
                    hit = (margin > sw[:, 1] - sw[:, 0])[mask]
                    row[f"objects_{name}"] = round(float(hit.float().mean()), 4)
            if on_row is not None:
                on_row(row)
            rows.append(row)
    return rows
