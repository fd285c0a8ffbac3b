"""`pretrain bench step --vs open_clip`: the same CLIP trained by open_clip_torch, timed in the same process.

The baseline is `open_clip.model.CLIP` built from a dict config with our shapes (vision/text widths,
layers, heads, patch size, image size, context length, padded vocabulary, embed_dim, mlp ratio,
activation), `open_clip.loss.ClipLoss` (or `SigLipLoss` when `objectives.contrastive.loss=siglip`) and
`torch.optim.AdamW` with our hyper-parameters, decay/no-decay groups and gradient clipping, trained the way
open_clip's own loop does (`training/train.py`: autocast for bf16/fp16, GradScaler for fp16, logit scale
clamped to ln 100 after each step). It sees the same synthetic batches (same generator, same seed, so both
sides also pay the same batch-creation cost) for the same warm-up and timed steps, on the same device and
threads. Full images by default; `patch_dropout` > 0 is open_clip's own FLIP option (a second line).

Parameters in common: open_clip's CLIP has exactly our image tower, text tower and logit scale (its
logit scale is 0-dim, ours shape [1]: one element each; nn.MultiheadAttention's in_proj is our fused qkv).
What only we have is the MAE decoder, the MLM head and SigLIP's bias when those exist; open_clip gets the
bias too under siglip. `shared_parameter_count` makes that exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from data_pipelines.tokenizer import EOS_ID, PAD_ID
from pretrain.bench.timing import timed_steps
from pretrain.config import Config

INSTALL_HINT = ("install the dev extra (`pip install -e '.[dev]'`: open_clip_torch and a torchvision "
                "matching your torch)")


class OpenClipUnavailable(RuntimeError):
    """open_clip (or the torchvision it imports) cannot be imported."""


def import_open_clip() -> Any:
    """The open_clip module, or OpenClipUnavailable saying why and what to install."""
    try:
        import open_clip
        import open_clip.loss  # noqa: F401  (ClipLoss / SigLipLoss)
        import open_clip.model  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to load its ops against this torch
        raise OpenClipUnavailable(f"--vs open_clip needs open_clip_torch, which is not importable "
                                  f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    return open_clip


def open_clip_config(cfg: Config, vocab_size: int, patch_dropout: float = 0.0) -> dict[str, Any]:
    """open_clip's CLIP(**config) arguments for our shapes; `vocab_size` is our padded vocabulary."""
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    c = cfg.objectives.contrastive
    return {
        "embed_dim": m.embed_dim,
        "quick_gelu": m.activation == "quick_gelu",
        "init_logit_scale": math.log(1.0 / c.init_temperature),
        "init_logit_bias": -10.0 if c.loss == "siglip" else None,
        "vision_cfg": {"layers": v.layers, "width": v.width, "head_width": v.width // v.heads,
                       "mlp_ratio": m.mlp_ratio, "patch_size": v.patch_size, "image_size": m.image_size,
                       "patch_dropout": patch_dropout},
        "text_cfg": {"context_length": t.context_length, "vocab_size": vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": m.mlp_ratio,
                     "pool_type": "eos", "eos_id": EOS_ID, "pad_id": PAD_ID},  # captions end in EOS
    }


def build_open_clip(cfg: Config, vocab_size: int, patch_dropout: float = 0.0) -> nn.Module:
    """open_clip.model.CLIP with our shapes, fp32 parameters (autocast handles bf16/fp16, as in open_clip)."""
    open_clip = import_open_clip()
    oc = open_clip_config(cfg, vocab_size, patch_dropout)
    model = open_clip.model.CLIP(oc["embed_dim"], oc["vision_cfg"], oc["text_cfg"],
                                 quick_gelu=oc["quick_gelu"], init_logit_scale=oc["init_logit_scale"],
                                 init_logit_bias=oc["init_logit_bias"], output_dict=True)
    vision_heads = model.visual.transformer.resblocks[0].attn.num_heads
    if vision_heads != cfg.model.vision.heads:  # head_width = width // heads must round-trip
        raise ValueError(f"open_clip built {vision_heads} vision heads, ours has {cfg.model.vision.heads}")
    return model


def shared_parameter_count(ours: nn.Module) -> int:
    """Our parameters that open_clip's CLIP also has: everything except the MAE decoder and the MLM head
    (SigLIP's logit bias is shared: open_clip builds one with init_logit_bias)."""
    only_ours = ("decoder.", "mlm_head.")
    return sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(only_ours))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's own split (`training/main.py`): no weight decay on 1-d parameters, biases, norms and
    the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_open_clip(cfg: Config, vocab_size: int, batches: Iterator[dict[str, torch.Tensor]],
                  device: torch.device, steps: int, warmup: int, patch_dropout: float = 0.0
                  ) -> dict[str, Any]:
    """Train open_clip's CLIP for `warmup` untimed and `steps` timed optimizer steps (each of
    `train.grad_accum` micro-batches of `train.micro_batch`) on `batches`; samples/s and time split."""
    open_clip = import_open_clip()
    torch.manual_seed(cfg.train.seed)
    model = build_open_clip(cfg, vocab_size, patch_dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    siglip = cfg.objectives.contrastive.loss == "siglip"
    loss_fn = open_clip.loss.SigLipLoss() if siglip else open_clip.loss.ClipLoss(cache_labels=True)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    precision = cfg.train.precision
    # open_clip trains bf16/fp16 as autocast over fp32 parameters (its amp_bf16 / amp precisions)
    amp_dtype = {"bf16": torch.bfloat16, "bf16_autocast": torch.bfloat16,
                 "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    max_scale = math.log(cfg.objectives.contrastive.max_logit_scale)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    accum = cfg.train.grad_accum

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(batches)
        return batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True)

    def forward(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(*batch)
            args = [out["image_features"], out["text_features"], out["logit_scale"]]
            if siglip:
                args.append(out["logit_bias"])
            return loss_fn(*args) / accum

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def optimizer(i: int) -> None:
        if i != accum - 1:
            return
        if scaler:
            scaler.unscale_(opt)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)

    timed = timed_steps(device, steps, warmup, accum, data, forward, backward, optimizer)
    micro, wall, cpu, phases = timed["micro"], timed["wall_s"], timed["cpu_s"], timed["phases"]
    last_loss = float(timed["last"].detach()) if timed["last"] is not None else float("nan")
    samples = micro * cfg.train.micro_batch
    out = {
        "library": f"open_clip_torch {getattr(open_clip, '__version__', '?')}",
        "patch_dropout": patch_dropout,
        "precision": precision,
        "precision_mode": (f"torch.autocast({device.type}, {amp_dtype}), fp32 parameters"
                           if amp_dtype is not None else "fp32"),
        "optimizer": "torch.optim.AdamW (defaults for this device)",
        "loss": "SigLipLoss" if siglip else "ClipLoss",
        "samples": samples, "wall_s": round(wall, 6), "samples_per_s": round(samples / wall, 3),
        "process_cpu_s": round(cpu, 4),
        "time_s": {k: round(v, 6) for k, v in phases.items()},
        "parameters": n_params,
        "final_loss": round(last_loss, 5),
    }
    if device.type == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _contrastive_patches(cfg: Config) -> float:
    """Share of patches our contrastive pass sees in a training step (`PretrainModel.contrastive_mask_ratio`:
    every patch with separate views, 1 - mask_ratio under a shared masked pass or without MAE)."""
    m = cfg.objectives.mim
    return 1.0 if (m.weight > 0 and not m.shared_pass) else 1.0 - m.mask_ratio


def like_for_like_changes(cfg: Config, patch_dropout: float) -> dict[str, Any]:
    """The settings (dotted key -> value) that make our step the open_clip side's work at `patch_dropout`:
    the contrastive loss alone (no MAE decoder, MLM head or fusion encoder), its pass seeing the same share
    of patches. {} when the configured run already does exactly that."""
    o = cfg.objectives
    off = (("objectives.mim.weight", o.mim.weight), ("objectives.mlm.weight", o.mlm.weight),
           ("objectives.itm.weight", o.itm.weight), ("model.fusion.layers", cfg.model.fusion.layers))
    changes: dict[str, Any] = {key: type(value)(0) for key, value in off if value}
    if o.contrastive.weight <= 0:
        changes["objectives.contrastive.weight"] = 1.0
    if o.mim.mask_ratio != patch_dropout:  # without MAE the contrastive pass hides mask_ratio of the patches
        changes["objectives.mim.mask_ratio"] = patch_dropout
    return changes


def with_changes(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of `cfg` with `changes` (dotted key -> value) applied, typed and validated as a loaded config
    is (`config_from_dict`)."""
    from pretrain.config import config_from_dict, to_dict

    tree = to_dict(cfg)
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = tree
        for part in path:
            node = node[part]
        node[leaf] = value
    return config_from_dict(tree)


def unlike_reason(cfg: Config, patch_dropout: float) -> str:
    """Why the configured step is not the open_clip side's work (for the label of its ratio)."""
    o, why = cfg.objectives, []
    for name, w in (("MAE decoder", o.mim.weight), ("MLM head", o.mlm.weight), ("ITM", o.itm.weight)):
        if w:
            why.append(f"ours also trains the {name} (weight {w})")
    if cfg.model.fusion.layers and not o.itm.weight:
        why.append("ours has a fusion encoder")
    if o.contrastive.weight <= 0:
        why.append("our contrastive loss is off")
    seen = _contrastive_patches(cfg)
    if seen != 1.0 - patch_dropout:
        why.append(f"our contrastive pass sees {seen:.0%} of the patches, open_clip's "
                   f"{1 - patch_dropout:.0%}")
    return "; ".join(why)


def open_clip_flops(cfg: Config, vocab_size: int, patch_dropout: float) -> int:
    """Analytic fwd+bwd model FLOPs per sample of the open_clip side: our formula with only the
    contrastive objective and the encoder seeing int(N * (1 - patch_dropout)) patches (PatchDropout
    truncates; `visible_patches` rounds, so the mask ratio is adjusted to land on the same count)."""
    import copy

    from pretrain.plan.flops import flops_per_sample

    c = copy.deepcopy(cfg)
    c.objectives.mim.weight = 0.0
    c.objectives.mlm.weight = 0.0
    c.objectives.contrastive.weight = 1.0
    n = (c.model.image_size // c.model.vision.patch_size) ** 2
    keep = max(1, int(n * (1.0 - patch_dropout))) if patch_dropout > 0 else n
    c.objectives.mim.mask_ratio = 1.0 - keep / n
    return flops_per_sample(c, vocab_size, global_batch=cfg.train.micro_batch)["train"]


def significant(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: a ratio of 0.009987 stays 0.009987 (4 decimals made it 0.01,
    0.13% off), and the relative rounding error is at most 5e-4 at any magnitude."""
    return float(f"{x:.{digits}g}")


def compare(ours: dict[str, Any], theirs: dict[str, Any], peak_flops: float | None = None,
            flops: int | None = None) -> dict[str, Any]:
    """One `vs_open_clip` entry: open_clip's numbers plus ratio = ours / open_clip samples/s, computed
    from the two reported (rounded) samples/s, and `ratio_per_cpu_s`, the same in samples per CPU-second
    of the process (when both report `process_cpu_s`)."""
    row = dict(theirs)
    row["ratio"] = significant(ours["samples_per_s"] / theirs["samples_per_s"])
    if ours.get("process_cpu_s") and theirs.get("process_cpu_s"):
        # the same ratio in samples per CPU-second: less sensitive to other load on a shared machine
        row["ratio_per_cpu_s"] = significant((ours["samples"] / ours["process_cpu_s"])
                                             / (theirs["samples"] / theirs["process_cpu_s"]))
    if flops is not None:
        row["flops_per_sample"] = flops
        if peak_flops:
            row["mfu"] = round(flops * theirs["samples_per_s"] / peak_flops, 5)
    return row
