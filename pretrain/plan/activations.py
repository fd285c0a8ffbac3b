"""Activation and workspace memory per rank, and the largest micro-batch that fits a GPU
(`pretrain plan --gpu-mem GB`). Analytic, from the transformer shapes; checked against measured CPU peaks
in tests/e2e/test_plan_memory.py. Model-state bytes live in `pretrain.plan.memory`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from parallel.engine import PREFETCH_DEFAULT, REDUCE_DEFAULT, zero3_tuning
from pretrain.config import Config

GIB = 2**30
WORKSPACE_FIXED_BYTES = GIB
"""CUDA context, NCCL and cuBLAS workspaces: device memory the caching allocator never reports."""
WORKSPACE_ACTIVATION_FRACTION = 0.10
"""Allocator fragmentation and short-lived temporaries, as a fraction of the activation bytes."""
# DeepSpeed's default `zero_optimization.reduce_bucket_size` and `stage3_prefetch_bucket_size` (elements),
# as parallel/engine.py names them: ZeRO-3 with contiguous gradients allocates one gradient bucket of the
# first up front; the second is what it gathers ahead of use.
DS_REDUCE_BUCKET_SIZE, DS_PREFETCH_BUCKET_SIZE = REDUCE_DEFAULT, PREFETCH_DEFAULT


def activation_bytes_per_element(precision: str) -> tuple[int, int]:
    """(residual stream, compute) bytes per activation element. bf16/fp16 engines run everything in the
    parameter dtype; bf16_autocast keeps the residual stream and norms in fp32 and runs matmuls in bf16."""
    return {"fp32": (4, 4), "bf16": (2, 2), "fp16": (2, 2), "bf16_autocast": (4, 2)}[precision]


def block_activation_bytes(width: int, tokens: int, heads: int, mlp_ratio: float, *, act: str = "gelu",
                           attention: str = "sdpa", tp: int = 1, residual: int = 2, compute: int = 2,
                           dropout: float = 0.0, attn_dropout: float = 0.0) -> int:
    """Bytes autograd keeps for one pre-LN block over `tokens` tokens of ONE sample (one TP rank).

    W = width, T = tokens, H = int(W * mlp_ratio), h = heads / tp; r = residual, c = compute bytes:
      residual stream x and x + attn (the two LayerNorms' inputs)       2 T W r
      LayerNorm outputs = inputs of qkv and fc1 (replicated under TP)   2 T W c
      q, k, v (views of the qkv output)                                 3 T W c / tp
      attention: sdpa  output + log-sum-exp                             T W c / tp + 4 h T
                 math  fp32 probabilities (+ their cast to c if c < 4)  h T^2 (4 + c)
      input of the output projection (a contiguous copy)                T W c / tp
      fc1 output (GELU input) and GELU output (fc2 input)               2 T H c / tp  (quick_gelu: 3)
      LayerNorm mean / rstd                                             16 T
      dropout masks when dropout > 0 (1 byte)                           2 T W; attention h T^2
    (attention dropout makes SDPA fall back to the math path: counted as math).
    """
    W, T, H, h = width, tokens, int(width * mlp_ratio), heads // tp
    out = 2 * T * W * residual + 2 * T * W * compute + 3 * T * W * compute // tp + T * W * compute // tp
    if attention == "math" or attn_dropout > 0:
        out += h * T * T * (4 + (compute if compute < 4 else 0))
    else:
        out += T * W * compute // tp + 4 * h * T
    out += (3 if act == "quick_gelu" else 2) * T * H * compute // tp
    out += 16 * T
    if dropout > 0:
        out += 2 * T * W
    if attn_dropout > 0:
        out += h * T * T
    return out


def _contrastive_bytes(cfg: Config, micro_batch: int, dp: int) -> tuple[int, str]:
    """Peak bytes of the contrastive loss for `micro_batch` rows against micro_batch x dp columns: the
    counts of `pretrain/bench_loss.computed_peak_bytes` (checked by measurement there) with B_local rows
    and B_global columns."""
    c = cfg.objectives.contrastive
    rows, cols, e = micro_batch, micro_batch * dp, cfg.model.embed_dim
    if c.weight <= 0 or cfg.train.task == "classify":  # classify: cross-entropy over [B, classes] instead
        return 0, "none"
    if c.chunk > 0:
        k = min(c.chunk, cols)
        return 10 * cols * e * 4 + 8 * k * k * 4 + 4 * cols * 4, f"tiled (chunk {c.chunk})"
    copies = 4 if c.loss == "infonce" else 5
    return copies * rows * cols * 4 + 4 * cols * e * 4, "plain logits"


def _largest_module_params(model: nn.Module, tp: int) -> int:
    """Per-TP-rank elements of the largest single module's own parameters (what ZeRO-3 gathers at once)."""
    from pretrain.parallelize import tp_split_dims

    dims = tp_split_dims(model)
    best = 0
    for mname, mod in model.named_modules():
        n = sum(p.numel() // (tp if dims[f"{mname}.{pn}" if mname else pn] is not None else 1)
                for pn, p in mod.named_parameters(recurse=False))
        best = max(best, n)
    return best


def _fusion_towers(cfg: Config, model: nn.Module, t_ctx: int, t_txt: int, r: int, c: int, dp: int
                   ) -> list[tuple[str, int, int, int, int, int]]:
    """The fusion encoder's passes per sample (3 for ITM: the positive and two negative pairs; 1 for the
    conditioned MLM), each block counted as a self-attention block over the caption plus its cross-
    attention (LN input, q, k and v over the `t_ctx` image tokens of the contrastive pass, output,
    residual), and for ITM the gathered text and image tokens of the whole data-parallel batch (dp rows
    per sample). Rough, as the rest."""
    m, o = cfg.model, cfg.objectives
    f = m.fusion
    itm = getattr(model, "itm_head", None) is not None
    passes = (3 if itm else 0) + (1 if o.mlm.weight > 0 and o.mlm.conditioned else 0)
    if f.layers == 0 or passes == 0:
        return []
    fw = f.width or m.text.width
    cross = (3 * t_txt * fw + 2 * t_ctx * fw) * c + t_txt * fw * r
    around = passes * (f.layers * cross + t_txt * fw * r)
    if itm:
        around += dp * (t_txt * m.text.width + t_ctx * m.vision.width) * r
    return [("fusion", f.layers * passes, fw, t_txt, f.heads, around)]


Tower = tuple[str, int, int, int, int, int]  # (name, layers, width, tokens, heads, bytes around the blocks)


def _contrastive_sees_every_patch(model: nn.Module, tail: bool) -> bool:
    """The model's own rule (`PretrainModel.contrastive_mask_ratio`) for a training forward in or out of
    the unmasked tail; the model's mode and tail switch are put back after asking."""
    was_training, was_tail = model.training, model.unmasked_tail
    model.train()
    model.set_unmasked_tail(tail)
    try:
        return model.contrastive_mask_ratio() == 0.0
    finally:
        model.set_unmasked_tail(was_tail)
        model.train(was_training)


def _pretrain_towers(cfg: Config, model: nn.Module, dp: int, r: int, c: int, tail: bool
                     ) -> tuple[list[Tower], int]:
    """The passes of one `PretrainModel` training forward (as its `forward` decides them), and the bytes
    of the input batch. `tail`: a step of `objectives.mim.unmasked_tail_steps` (no MAE loss, the
    contrastive pass over every patch).

    The first image pass (contrastive, ITM, conditioned MLM, features target, or FLIP+MAE shared) sees
    every patch (`vision_encoder_full`, 1 + N tokens) when `contrastive_mask_ratio()` is 0: in the tail
    and with separate views (`objectives.mim.shared_pass: false` with MIM on, the default); otherwise the
    visible ones (`vision_encoder`, 1 + N_vis). With separate views MIM then runs its own masked pass."""
    m, o = cfg.model, cfg.objectives
    v, t, d = m.vision, m.text, m.decoder
    use_con, use_mlm = o.contrastive.weight > 0, o.mlm.weight > 0
    use_mim = o.mim.weight > 0 and not tail
    n = (m.image_size // v.patch_size) ** 2
    from pretrain.plan.flops import visible_patches

    t_vis, t_full, t_txt, t_dec = 1 + visible_patches(n, o.mim.mask_ratio), 1 + n, t.context_length, 1 + n
    unmasked = _contrastive_sees_every_patch(model, tail)
    itm, conditioned = getattr(model, "itm_head", None) is not None, use_mlm and o.mlm.conditioned
    first = (use_con or (use_mim and not unmasked) or (use_mim and o.mim.target == "features") or itm
             or conditioned)
    vocab_local = model.vocab_size // cfg.parallel.tp
    towers: list[Tower] = []
    if first:
        tok = t_full if unmasked else t_vis
        towers.append(("vision_encoder_full" if unmasked else "vision_encoder", v.layers, v.width, tok,
                       v.heads, 3 * tok * v.width * r))
    if use_mim and unmasked:  # separate views: MAE's own masked pass
        towers.append(("vision_encoder", v.layers, v.width, t_vis, v.heads, 3 * t_vis * v.width * r))
    if use_con:
        towers.append(("text_causal", t.layers, t.width, t_txt, t.heads, 2 * t_txt * t.width * r))
    if use_mim:
        towers.append(("decoder", d.layers, d.width, t_dec, d.heads,
                       t_dec * d.width * c + 2 * t_dec * d.width * r + n * 3 * v.patch_size ** 2 * 4))
    if use_mlm:
        towers.append(("text_mlm", t.layers, t.width, t_txt, t.heads,
                       2 * t_txt * t.width * r + 3 * t_txt * t.width * c + t_txt * vocab_local * 4))
    towers += _fusion_towers(cfg, model, t_full if unmasked else t_vis, t_txt, r, c, dp)
    image_bytes = 4 if cfg.train.precision in ("fp32", "bf16_autocast") else 2
    inputs = (3 * m.image_size ** 2 + n) * image_bytes + 3 * t_txt * 8  # image, patch noise, 3 id tensors
    return towers, inputs


def _classify_towers(cfg: Config, model: nn.Module, r: int, c: int) -> tuple[list[Tower], int]:
    """`train.task=classify` (`ClassifierModel`): one image pass over every patch, then the head over the
    normalised embedding: its input, the fp32 logits and cross-entropy's log-probabilities (the head's
    bytes sit in the pass's `around`). Inputs: the image and its label."""
    m, v = cfg.model, cfg.model.vision
    n, classes = (m.image_size // v.patch_size) ** 2, model.num_classes
    tok = 1 + n
    head = 2 * m.embed_dim * c + 2 * classes * 4
    towers: list[Tower] = [("vision_encoder_full", v.layers, v.width, tok, v.heads,
                            3 * tok * v.width * r + head)]
    image_bytes = 4 if cfg.train.precision in ("fp32", "bf16_autocast") else 2
    return towers, 3 * m.image_size ** 2 * image_bytes + 8


def _phase_bytes(cfg: Config, towers: list[Tower], inputs: int, model: nn.Module, r: int, c: int,
                 mlm: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Per-sample parts without and with checkpointing of one forward's towers."""
    m, tp = cfg.model, cfg.parallel.tp
    common = dict(act=m.activation, attention=getattr(m, "attention", "sdpa"), tp=tp, residual=r, compute=c,
                  dropout=m.dropout, attn_dropout=m.attention_dropout)
    full: dict[str, int] = {"inputs": inputs}
    ckpt: dict[str, int] = {"inputs": inputs}
    largest_block = 0
    for name, layers, width, tokens, heads, around in towers:
        blk = block_activation_bytes(width, tokens, heads, m.mlp_ratio, **common)
        largest_block = max(largest_block, blk)
        full[name] = layers * blk + around
        ckpt[name] = layers * tokens * width * r + around  # checkpoint() keeps each block's input
    ckpt["recompute_one_block"] = largest_block
    if mlm:  # first backward step: fp32 gradient of the log-probs and of the logits (+ cast)
        transient = m.text.context_length * (model.vocab_size // tp) * (8 + (c if c < 4 else 0))
        full["mlm_loss_backward"] = ckpt["mlm_loss_backward"] = transient
    return full, ckpt


def activation_plan(cfg: Config, model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """Activation bytes per sample with and without checkpointing, the contrastive term, and the workspace
    (the `activations` and `workspace` entries of the plan; see the module docstring for the keys).

    Per sample, without checkpointing, every block of every pass that runs in training
    (`_pretrain_towers`: the image passes, causal text pass, MAE decoder over 1 + all patches,
    bidirectional MLM pass, fusion; `_classify_towers` for `train.task=classify`), plus what sits around
    the blocks: ln_pre / ln_post / ln_final / decoder_norm inputs and outputs, the MLM head's three hidden
    tensors and its fp32 log-probabilities with the two fp32 gradient buffers of the first backward step,
    MAE's fp32 pixel difference, and the input batch. With checkpointing each block keeps only its input,
    and one block's full activations exist again while it is recomputed (the largest block). With
    `objectives.mim.unmasked_tail_steps` the tail's forward (every patch, no MAE) is planned too and the
    larger of the two phases is reported (`phase`). The contrastive loss grows with micro-batch x global
    batch and is kept apart (`_contrastive_bytes`).
    """
    m, o, dp = cfg.model, cfg.objectives, plan["dp"]
    r, c = activation_bytes_per_element(cfg.train.precision)
    n = (m.image_size // m.vision.patch_size) ** 2
    classify = cfg.train.task == "classify"
    phases: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    if classify:
        phases["classify"] = _phase_bytes(cfg, *_classify_towers(cfg, model, r, c), model, r, c, False)
    else:
        mlm = o.mlm.weight > 0
        phases["masked"] = _phase_bytes(cfg, *_pretrain_towers(cfg, model, dp, r, c, False), model, r, c, mlm)
        if o.mim.unmasked_tail_steps > 0:
            phases["unmasked_tail"] = _phase_bytes(cfg, *_pretrain_towers(cfg, model, dp, r, c, True), model,
                                                   r, c, mlm)
    parts, phase = {}, {}
    for i, key in enumerate(("no_checkpointing", "checkpointing")):
        phase[key] = max(phases, key=lambda p: sum(phases[p][i].values()))
        parts[key] = phases[phase[key]][i]
    from pretrain.plan.flops import visible_patches

    tokens = ({"vision": 1 + n, "text": 0, "decoder": 0} if classify else
              {"vision": 1 + visible_patches(n, o.mim.mask_ratio), "text": m.text.context_length,
               "decoder": 1 + n})
    b = cfg.train.micro_batch
    con_bytes, con_kind = _contrastive_bytes(cfg, b, dp)
    per_sample = {k: sum(v.values()) for k, v in parts.items()}
    activations = {
        "bytes_per_element": {"residual": r, "compute": c}, "attention": getattr(m, "attention", "sdpa"),
        "tokens": tokens, "per_sample_bytes": per_sample, "per_sample_parts": parts, "phase": phase,
        "contrastive": {"kind": con_kind, "columns_per_row": b * dp, "bytes_at_micro_batch": con_bytes},
        "micro_batch": b,
        "at_micro_batch_bytes": {k: b * v + con_bytes for k, v in per_sample.items()},
    }
    tp = cfg.parallel.tp
    pb = plan["bytes_per_param"]["params"]
    mine = plan["params"]["per_tp_rank"]
    buffers: dict[str, int] = {}
    stage = cfg.parallel.zero_stage
    # the bucket sizes the engine will derive for this model (parallel/engine.py: never larger than the model)
    tuning = zero3_tuning(cfg.parallel, max(cfg.model.vision.width, cfg.model.text.width), mine)
    if stage >= 2:
        buffers["reduce_bucket"] = tuning["reduce_bucket_size"] * plan["bytes_per_param"]["grads"]
    if stage == 3:
        gathered = min(mine, _largest_module_params(model, tp) + tuning["stage3_prefetch_bucket_size"])
        buffers["gathered_params"] = gathered * pb
    if cfg.train.precision == "bf16_autocast":
        buffers["autocast_weight_copies"] = 2 * mine
    workspace = {"fixed_bytes": WORKSPACE_FIXED_BYTES, "activation_fraction": WORKSPACE_ACTIVATION_FRACTION,
                 "zero_buffers_bytes": sum(buffers.values()), "zero_buffers": buffers}
    return {"activations": activations, "workspace": workspace}


def total_bytes_at(plan: dict[str, Any], cfg: Config, micro_batch: int, checkpointing: bool) -> int:
    """Model states + activations + workspace of one rank at `micro_batch`."""
    key = "checkpointing" if checkpointing else "no_checkpointing"
    act = plan["activations"]["per_sample_bytes"][key] * micro_batch
    act += _contrastive_bytes(cfg, micro_batch, plan["dp"])[0]
    w = plan["workspace"]
    return round(plan["per_rank_bytes"]["total"] + act * (1 + w["activation_fraction"]) + w["fixed_bytes"]
                 + w["zero_buffers_bytes"])


def max_micro_batch(plan: dict[str, Any], cfg: Config, budget: int, checkpointing: bool,
                    limit: int = 1 << 24) -> int:
    """Largest micro-batch whose total fits in `budget` bytes (0 if not even one sample does)."""
    if total_bytes_at(plan, cfg, 1, checkpointing) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and total_bytes_at(plan, cfg, hi, checkpointing) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # total is increasing in the micro-batch: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_bytes_at(plan, cfg, mid, checkpointing) <= budget else (lo, mid)
    return lo


def fit_plan(plan: dict[str, Any], cfg: Config, gpu_mem_gb: float) -> dict[str, Any]:
    """The `fit` entry: the largest micro-batch under `gpu_mem_gb` GiB with and without checkpointing."""
    budget = int(gpu_mem_gb * GIB)
    b, ac = cfg.train.micro_batch, cfg.train.activation_checkpointing
    total = total_bytes_at(plan, cfg, b, ac)
    return {"gpu_mem_bytes": budget,
            "max_micro_batch": {"no_checkpointing": max_micro_batch(plan, cfg, budget, False),
                                "checkpointing": max_micro_batch(plan, cfg, budget, True)},
            "configured": {"micro_batch": b, "activation_checkpointing": ac, "total_bytes": total,
                           "fits": total <= budget}}


# ---------------------------------------------------------------------------------- formatting
