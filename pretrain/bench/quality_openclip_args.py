"""`bench quality`, recipe `open_clip_train`: how our settings reach open_clip_train, which `--set` keys
cannot, and whether the baseline really trained.

The open_clip row is there to differ from ours in the trainer only. So every setting a `--set` changes
must reach open_clip_train with the same meaning (an open_clip flag or `model_cfg` field), or change
nothing either side computes differently; `FOLLOWED` lists those keys (a key ending in "." stands for its
section), `SAME_ONLY_IF` the ones open_clip follows only at some values. Any other `--set` is refused
before anything is written, naming the key: the comparison would not be like-for-like.
Our `train.grad_clip=0` means "no clipping" and is passed as no `--grad-clip-norm` at all: open_clip
calls `clip_grad_norm_(params, 0.0)`, which scales every gradient to 0, and trains nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config

FOLLOWED: dict[str, str] = {
    "model.embed_dim": "model_cfg", "model.mlp_ratio": "model_cfg",
    "model.activation": "model_cfg quick_gelu",
    "model.vocab_pad_multiple": "model_cfg vocab_size", "model.vision.patch_size": "model_cfg",
    "model.vision.width": "model_cfg", "model.vision.layers": "model_cfg", "model.vision.heads": "model_cfg",
    "model.text.": "model_cfg text_cfg", "model.dropout": "none in open_clip's CLIP",
    "model.attention_dropout": "none in open_clip's CLIP", "model.fusion.": "none in open_clip's CLIP",
    "model.attention": "a kernel choice, same results", "model.fused_layernorm": "a kernel choice",
    "model.decoder.": "the MAE decoder, off in this recipe",
    "data.vocab_size": "the tokenizer both sides use", "data.mean": "--image-mean", "data.std": "--image-std",
    "data.crop_scale": "--aug-cfg scale", "data.workers": "loader processes",
    "data.max_image_pixels": "a safety limit", "data.max_sample_bytes": "a safety limit",
    "data.max_bad_fraction": "a safety limit", "data.bad_check_after": "a safety limit",
    "data.log_keys": "logging", "data.tokenizer_samples": "the bench writes the tokenizer",
    "data.val": "not read by training",
    "optim.lr": "--lr", "optim.betas": "--beta1 --beta2", "optim.eps": "--eps", "optim.weight_decay": "--wd",
    "optim.warmup_steps": "--warmup", "optim.schedule": "--lr-scheduler cosine|const",
    "optim.min_lr_ratio": "open_clip's cosine ends at 0", "optim.lr_mult": "one learning rate in open_clip",
    "optim.impl": "an implementation choice",
    "train.grad_clip": "--grad-clip-norm (0: no flag, no clipping)", "train.precision": "--precision",
    "train.activation_checkpointing": "recomputation only", "train.compile": "compilation only",
    "train.compile_scope": "compilation only", "train.stop_check_every": "signal handling",
    "train.nonfinite_patience": "a guard", "train.global_batch": "a check",
    "objectives.contrastive.init_temperature": "model_cfg init_logit_scale",
    "objectives.contrastive.chunk": "same loss and gradients",
    "objectives.contrastive.max_logit_scale": "open_clip clamps at 100",
    "objectives.contrastive.loss": "ClipLoss", "objectives.contrastive.weight": "weight 1 in open_clip",
    "objectives.mim.": "off in this recipe", "objectives.mlm.": "off in this recipe",
    "objectives.itm.": "needs a fusion encoder", "parallel.": "one process: layout only",
    "logging.": "logging", "checkpoint.": "saving", "eval.": "measuring only",
    "finetune.": "not pre-training",
}
"""`--set` keys open_clip_train follows (mapped, or changing nothing either side computes differently)."""

SAME_ONLY_IF: dict[str, tuple[Callable[[Config], bool], str]] = {
    "model.dropout": (lambda c: c.model.dropout == 0, "open_clip_train's CLIP has no dropout here"),
    "model.attention_dropout": (lambda c: c.model.attention_dropout == 0,
                                "open_clip_train's CLIP has no attention dropout here"),
    "model.fusion.": (lambda c: c.model.fusion.layers == 0, "open_clip's CLIP has no fusion encoder"),
    "objectives.itm.": (lambda c: c.model.fusion.layers == 0, "open_clip_train has no ITM objective"),
    "optim.min_lr_ratio": (lambda c: c.optim.schedule == "constant" or c.optim.min_lr_ratio == 0,
                           "open_clip_train's cosine decays to 0 (only optim.min_lr_ratio=0 matches it)"),
    "optim.lr_mult": (lambda c: not c.optim.lr_mult, "open_clip_train has one learning rate for all weights"),
    "train.precision": (lambda c: c.train.precision in PRECISION,
                        "open_clip_train has fp32 and amp_bf16 (our bf16_autocast); bf16 or fp16 weights "
                        "have no equivalent there"),
    "objectives.contrastive.max_logit_scale": (lambda c: c.objectives.contrastive.max_logit_scale == 100,
                                               "open_clip_train clamps the logit scale at 100"),
    "objectives.contrastive.loss": (lambda c: c.objectives.contrastive.loss == "infonce",
                                    "open_clip_train's --siglip starts scale and bias its own way"),
    "objectives.contrastive.weight": (lambda c: c.objectives.contrastive.weight == 1,
                                      "open_clip_train's loss has weight 1 (scaled, it clips differently)"),
    "optim.schedule": (lambda c: c.optim.schedule in SCHEDULE, "open_clip_train has cosine and const"),
}
"""Keys open_clip follows only at these values: (does it, at the configured value?, why not otherwise)."""

PRECISION = {"fp32": "fp32", "bf16_autocast": "amp_bf16"}
"""Our `train.precision` -> open_clip's `--precision` with the same arithmetic (fp32 parameters)."""
SCHEDULE = {"cosine": "cosine", "constant": "const"}
"""Our `optim.schedule` -> open_clip's `--lr-scheduler`: the same warm-up (step + 1) / warmup and decay."""


def _match(key: str, table: dict[str, Any]) -> str | None:
    """The entry of `table` naming `key` itself or its section ("model.text." for model.text.width)."""
    if key in table:
        return key
    sections = [k for k in table if k.endswith(".") and key.startswith(k)]
    return max(sections, key=len) if sections else None


def open_clip_set_problems(sets: list[str] | None, base: list[str]) -> list[str]:
    """One message per `--set KEY=VALUE` that open_clip_train cannot follow with the same meaning; `base`:
    the overrides of the open_clip_train recipe on the embedded config, before those `--set`."""
    from pretrain.config import embedded_config_path, load_config

    problems, followed = [], []
    for kv in sets or []:
        key = kv.split("=", 1)[0]
        if _match(key, FOLLOWED) is None:
            problems.append(f"--set {key}: open_clip_train has no equivalent setting")
        else:
            followed.append(kv)
    if followed:
        cfg = load_config(embedded_config_path(), [*base, *followed])
        for kv in followed:
            entry = _match(kv.split("=", 1)[0], SAME_ONLY_IF)
            if entry is not None and not SAME_ONLY_IF[entry][0](cfg):
                problems.append(f"--set {kv}: {SAME_ONLY_IF[entry][1]}")
    return problems


def open_clip_argv(cfg: Config, train: str, per_epoch: int, epochs: int, logs: Path, device: str
                   ) -> list[str]:
    """open_clip_train's command line for our config: same batch, optimizer, schedule, clipping, precision,
    seed and augmentation; `per_epoch` x `epochs` samples (`epoch_plan`)."""
    o, d, t = cfg.optim, cfg.data, cfg.train
    if t.precision not in PRECISION or o.schedule not in SCHEDULE:
        raise ValueError(f"open_clip_train has no equivalent of train.precision={t.precision} / "
                         f"optim.schedule={o.schedule}")
    clip = ["--grad-clip-norm", str(t.grad_clip)] if t.grad_clip > 0 else []  # 0 would zero the gradients
    return [
        "--train-data", train, "--dataset-type", "webdataset", "--train-num-samples", str(per_epoch),
        "--model", "mmpt_quality", "--batch-size", str(t.micro_batch * t.grad_accum), "--epochs", str(epochs),
        "--lr", str(o.lr), "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]), "--eps", str(o.eps),
        "--wd", str(o.weight_decay), "--warmup", str(o.warmup_steps), "--lr-scheduler", SCHEDULE[o.schedule],
        *clip, "--precision", PRECISION[t.precision], "--workers", "1",
        "--device", device, "--seed", str(t.seed), "--logs", str(logs), "--name", "run",
        "--save-frequency", str(epochs), "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--report-to", "", "--log-every-n-steps", "10",
        "--image-mean", *map(str, d.mean), "--image-std", *map(str, d.std),
        "--aug-cfg", f"scale=({d.crop_scale[0]}, {d.crop_scale[1]})",
    ]


NORM = re.compile(r"(^|\.)ln_[^.]*\.(weight|bias)$")


def trained_check(state: dict[str, torch.Tensor], init_logit_scale: float) -> dict[str, Any]:
    """Did open_clip_train move the weights? Its logit scale and LayerNorms get no weight decay and start
    at exact values (ln(1/T), weight 1, bias 0): a run whose gradients never reached the weights leaves
    all of them bit for bit where they started, while any real step moves them (Adam)."""
    start = torch.tensor(init_logit_scale, dtype=torch.float32)
    end = state["logit_scale"].reshape(()).float()
    norms_moved = sum(not torch.equal(v, torch.full_like(v, 1.0 if k.endswith("weight") else 0.0))
                      for k, v in state.items() if NORM.search(k))
    return {"baseline_trained": bool(end != start) or norms_moved > 0,
            "logit_scale_start": round(math.exp(float(start)), 4),
            "logit_scale_end": round(math.exp(float(end)), 4), "norm_tensors_moved": norms_moved}
