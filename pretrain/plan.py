"""Per-rank model-state memory: `pretrain plan --config FILE --world N` and the training start-up report.

The plan builds the model on the meta device (no memory, no process groups), counts every parameter as
split over tensor-parallel ranks or replicated (the layer factory tags split ones with
`tp_partition_dim` at any tp), and applies ZeRO stage s over the data-parallel degree dp = world / tp:

    bytes per parameter   bf16/fp16: 2 (param) + 2 (grad) + 12 (fp32 master + Adam m, v)
                          fp32:      4 (param) + 4 (grad) + 12 under ZeRO >= 1 (DeepSpeed's ZeRO
                                     optimizers keep a separate fp32 master even in fp32; measured),
                                     + 8 without ZeRO (Adam m, v; the parameter is the master)
    ZeRO stage            0: nothing partitioned, 1: optimizer / dp, 2: + grads / dp, 3: + params / dp
                          (ZeRO-3 also keeps a whole copy of parameters below
                          parallel.persistence_threshold next to their partition)

Split parameters divide by tp, replicated ones do not, which is why per-rank bytes are a little above
total / world. At start-up the trainer logs the same table for the real model, and after the first step
every rank measures what DeepSpeed actually holds (`parallel/memory.py`); rank 0 writes both to
RUN_DIR/memory.json.

`pretrain plan --gpu-mem GB` adds activations and a workspace margin and prints the largest micro-batch
that fits, with and without activation checkpointing (`activation_plan`; the accounting is documented
there and in `block_activation_bytes`). JSON keys added by the plan CLI:

    activations   bytes_per_element {residual, compute}, attention, tokens {vision, text, decoder},
                  per_sample_bytes {no_checkpointing, checkpointing} and per_sample_parts {same: {part:
                  bytes}}, contrastive {kind, columns_per_row, bytes_at_micro_batch}, micro_batch,
                  at_micro_batch_bytes {no_checkpointing, checkpointing}
    workspace     fixed_bytes, activation_fraction, zero_buffers_bytes, zero_buffers {name: bytes}
    fit           (only with --gpu-mem) gpu_mem_bytes, max_micro_batch {no_checkpointing, checkpointing},
                  configured {micro_batch, activation_checkpointing, total_bytes, fits}
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import Config, load_config, validate

log = logging.getLogger("mmpt.plan")

PARAM_GRAD_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bf16_autocast": 4}


def bytes_per_param(precision: str, zero_stage: int) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per parameter. The optimizer holds Adam's two fp32 moments plus an
    fp32 master copy: always with bf16/fp16, and under ZeRO >= 1 also in fp32, since DeepSpeed's ZeRO
    optimizers keep their own fp32 partition (a clone; measured on 0.19.8). Only fp32 without ZeRO
    updates the parameters in place (8 bytes of moments)."""
    pg = PARAM_GRAD_BYTES[precision]
    fp32_params = precision in ("fp32", "bf16_autocast")  # autocast: fp32 parameters, bf16 compute
    return pg, pg, 8 if (fp32_params and zero_stage == 0) else 12


# ------------------------------------------------------------------------------------ counting
def count_params(model: nn.Module, tp: int, built_tp: int = 1, persistence_threshold: int = 0
                 ) -> dict[str, int]:
    """Parameter counts of the FULL model and of one TP rank's share.

    `model` may be the single-device model (built_tp = 1, e.g. on the meta device) or one rank's
    tensor-parallel model (built_tp = tp); `persistent` counts the per-rank elements of parameters
    ZeRO-3 would keep whole (fewer elements than `persistence_threshold`)."""
    from pretrain.models.layers import partition_dim

    total = split = per_rank = persistent = 0
    for name, p in model.named_parameters():
        local = int(getattr(p, "ds_numel", 0)) or p.numel()  # ZeRO-3 empties .data; ds_numel keeps size
        dim = partition_dim(p)
        if dim is None:
            full, mine = local, local
        else:
            full = local * built_tp
            full_dim = p.ds_shape[dim] * built_tp if hasattr(p, "ds_shape") else p.shape[dim] * built_tp
            if full_dim % tp:
                raise ValueError(f"{name}: dimension {dim} of size {full_dim} does not split over tp={tp}")
            split += full
            mine = full // tp
        total += full
        per_rank += mine
        if mine < persistence_threshold:
            persistent += mine
    return {"total": total, "split": split, "replicated": total - split, "per_tp_rank": per_rank,
            "persistent_per_tp_rank": persistent}


def bytes_per_rank(counts: dict[str, int], precision: str, zero_stage: int, dp: int) -> dict[str, int]:
    """Model-state bytes one rank holds (see the module docstring for the accounting)."""
    pb, gb, ob = bytes_per_param(precision, zero_stage)
    mine, keep = counts["per_tp_rank"], counts["persistent_per_tp_rank"] if zero_stage == 3 else 0
    # ZeRO-3: every parameter's 1/dp partition, plus a whole copy of each persistent one
    params = pb * (keep + mine / dp) if zero_stage == 3 else pb * mine
    grads = gb * mine / (dp if zero_stage >= 2 else 1)
    optimizer = ob * mine / (dp if zero_stage >= 1 else 1)
    out = {"params": round(params), "grads": round(grads), "optimizer": round(optimizer)}
    out["total"] = sum(out.values())
    return out


def plan_for_model(cfg: Config, model: nn.Module, world: int, built_tp: int = 1) -> dict[str, Any]:
    """The memory plan of `model` (single-device or one TP rank's) trained with `cfg` on `world` ranks."""
    tp = cfg.parallel.tp
    dp = world // tp
    p = cfg.parallel
    threshold = p.persistence_threshold if p.zero_stage == 3 else 0
    counts = count_params(model, tp, built_tp, threshold)
    pb, gb, ob = bytes_per_param(cfg.train.precision, p.zero_stage)
    return {
        "world": world, "tp": tp, "dp": dp, "zero_stage": p.zero_stage, "precision": cfg.train.precision,
        "params": counts,
        "bytes_per_param": {"params": pb, "grads": gb, "optimizer": ob},
        "per_rank_bytes": bytes_per_rank(counts, cfg.train.precision, p.zero_stage, dp),
        "total_bytes": counts["total"] * (pb + gb + ob),  # the single-device model, same accounting
    }


def plan_vocab_size(cfg: Config) -> int:
    """The configured tokenizer's size, else `data.vocab_size` (the most a trained tokenizer can have)."""
    if cfg.data.tokenizer:
        from data_pipelines.tokenizer import TextTokenizer

        return TextTokenizer.load(cfg.data.tokenizer).vocab_size
    return cfg.data.vocab_size


def memory_plan(cfg: Config, world: int, gpu_mem_gb: float | None = None) -> dict[str, Any]:
    """Plan for `cfg` on `world` ranks without launching anything: the model is built on the meta device
    (single-device layout; split parameters are recognised by their factory tag). Includes the activation
    and workspace estimate, and with `gpu_mem_gb` the largest micro-batch that fits (`fit`)."""
    from parallel.groups import tp_size
    from pretrain.models.pretrain_model import PretrainModel

    validate(cfg, world_size=world)
    if tp_size() != 1:
        raise RuntimeError("memory_plan builds the single-device layout; call it outside a TP run "
                           "(inside one, use plan_for_model with the rank's model)")
    with torch.device("meta"):
        model = PretrainModel(cfg.model, cfg.objectives, vocab_size=plan_vocab_size(cfg))
    plan = plan_for_model(cfg, model, world)
    plan["vocab_padded"] = model.vocab_size
    plan.update(activation_plan(cfg, model, plan))
    if gpu_mem_gb is not None:
        if gpu_mem_gb <= 0:
            raise ValueError("--gpu-mem must be > 0 (GiB per device)")
        plan["fit"] = fit_plan(plan, cfg, gpu_mem_gb)
    return plan


# --------------------------------------------------------------------------------- activations
GIB = 2**30
WORKSPACE_FIXED_BYTES = GIB
"""CUDA context, NCCL and cuBLAS workspaces: device memory the caching allocator never reports."""
WORKSPACE_ACTIVATION_FRACTION = 0.10
"""Allocator fragmentation and short-lived temporaries, as a fraction of the activation bytes."""
DS_REDUCE_BUCKET_SIZE = 500_000_000
"""DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements): ZeRO-3 with contiguous
gradients allocates one gradient bucket of this many elements up front, whatever the model size."""
DS_PREFETCH_BUCKET_SIZE = 50_000_000
"""DeepSpeed's default `stage3_prefetch_bucket_size` (elements): parameters gathered ahead of use."""


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
    if c.weight <= 0:
        return 0, "none"
    if c.chunk > 0:
        k = min(c.chunk, cols)
        return 10 * cols * e * 4 + 8 * k * k * 4 + 4 * cols * 4, f"tiled (chunk {c.chunk})"
    copies = 4 if c.loss == "infonce" else 5
    return copies * rows * cols * 4 + 4 * cols * e * 4, "plain logits"


def _largest_module_params(model: nn.Module, tp: int) -> int:
    """Per-TP-rank elements of the largest single module's own parameters (what ZeRO-3 gathers at once)."""
    from pretrain.models.layers import partition_dim

    best = 0
    for mod in model.modules():
        n = sum(p.numel() // (tp if partition_dim(p) is not None else 1)
                for p in mod.parameters(recurse=False))
        best = max(best, n)
    return best


def activation_plan(cfg: Config, model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """Activation bytes per sample with and without checkpointing, the contrastive term, and the workspace
    (the `activations` and `workspace` entries of the plan; see the module docstring for the keys).

    Per sample, without checkpointing, every block of every pass that runs in training (vision encoder
    over the 1 + visible patches, causal text pass, MAE decoder over 1 + all patches, bidirectional MLM
    pass), plus what sits around the blocks: ln_pre / ln_post / ln_final / decoder_norm inputs and
    outputs, the MLM head's three hidden tensors and its fp32 log-probabilities with the two fp32
    gradient buffers of the first backward step, MAE's fp32 pixel difference, and the input batch.
    With checkpointing each block keeps only its input, and one block's full activations exist again
    while it is recomputed (the largest block). The contrastive loss grows with micro-batch x global
    batch and is kept apart (`_contrastive_bytes`).
    """
    m, o, tp, dp = cfg.model, cfg.objectives, cfg.parallel.tp, plan["dp"]
    r, c = activation_bytes_per_element(cfg.train.precision)
    attention = getattr(m, "attention", "sdpa")
    common = dict(act=m.activation, attention=attention, tp=tp, residual=r, compute=c, dropout=m.dropout,
                  attn_dropout=m.attention_dropout)
    v, t, d = m.vision, m.text, m.decoder
    use_con, use_mim, use_mlm = o.contrastive.weight > 0, o.mim.weight > 0, o.mlm.weight > 0
    n = (m.image_size // v.patch_size) ** 2
    from pretrain.flops import visible_patches

    t_vis, t_txt, t_dec = 1 + visible_patches(n, o.mim.mask_ratio), t.context_length, 1 + n
    vocab_local = model.vocab_size // tp
    towers = []  # (name, layers, width, tokens, heads, extra bytes around the blocks)
    if use_con or use_mim:
        towers.append(("vision_encoder", v.layers, v.width, t_vis, v.heads, 3 * t_vis * v.width * r))
    if use_con:
        towers.append(("text_causal", t.layers, t.width, t_txt, t.heads, 2 * t_txt * t.width * r))
    if use_mim:
        towers.append(("decoder", d.layers, d.width, t_dec, d.heads,
                       t_dec * d.width * c + 2 * t_dec * d.width * r + n * 3 * v.patch_size ** 2 * 4))
    if use_mlm:
        towers.append(("text_mlm", t.layers, t.width, t_txt, t.heads,
                       2 * t_txt * t.width * r + 3 * t_txt * t.width * c + t_txt * vocab_local * 4))
    image_bytes = 4 if cfg.train.precision in ("fp32", "bf16_autocast") else 2
    inputs = (3 * m.image_size ** 2 + n) * image_bytes + 3 * t_txt * 8  # image, patch noise, 3 id tensors
    full: dict[str, int] = {"inputs": inputs}
    ckpt: dict[str, int] = {"inputs": inputs}
    largest_block = 0
    for name, layers, width, tokens, heads, around in towers:
        blk = block_activation_bytes(width, tokens, heads, m.mlp_ratio, **common)
        largest_block = max(largest_block, blk)
        full[name] = layers * blk + around
        ckpt[name] = layers * tokens * width * r + around  # checkpoint() keeps each block's input
    ckpt["recompute_one_block"] = largest_block
    if use_mlm:  # first backward step: fp32 gradient of the log-probs and of the logits (+ cast)
        transient = t_txt * vocab_local * (8 + (c if c < 4 else 0))
        full["mlm_loss_backward"] = ckpt["mlm_loss_backward"] = transient
    b = cfg.train.micro_batch
    con_bytes, con_kind = _contrastive_bytes(cfg, b, dp)
    per_sample = {"no_checkpointing": sum(full.values()), "checkpointing": sum(ckpt.values())}
    activations = {
        "bytes_per_element": {"residual": r, "compute": c}, "attention": attention,
        "tokens": {"vision": t_vis, "text": t_txt, "decoder": t_dec},
        "per_sample_bytes": per_sample,
        "per_sample_parts": {"no_checkpointing": full, "checkpointing": ckpt},
        "contrastive": {"kind": con_kind, "columns_per_row": b * dp, "bytes_at_micro_batch": con_bytes},
        "micro_batch": b,
        "at_micro_batch_bytes": {k: b * v + con_bytes for k, v in per_sample.items()},
    }
    pb = plan["bytes_per_param"]["params"]
    mine = plan["params"]["per_tp_rank"]
    buffers: dict[str, int] = {}
    stage = cfg.parallel.zero_stage
    if stage >= 2:
        buffers["reduce_bucket"] = DS_REDUCE_BUCKET_SIZE * plan["bytes_per_param"]["grads"]
    if stage == 3:
        gathered = min(mine, _largest_module_params(model, tp) + DS_PREFETCH_BUCKET_SIZE)
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
def _mib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def format_plan(plan: dict[str, Any], measured: list[dict[str, Any]] | None = None) -> str:
    """Human-readable table of a plan (and, when given, each rank's measured bytes)."""
    c, b, r = plan["params"], plan["bytes_per_param"], plan["per_rank_bytes"]
    lines = [
        f"model states: world {plan['world']} = tp {plan['tp']} x dp {plan['dp']}, ZeRO-{plan['zero_stage']},"
        f" {plan['precision']} ({b['params']} + {b['grads']} + {b['optimizer']} bytes per parameter)",
        f"  parameters  total {c['total']:,}  split over TP {c['split']:,}  replicated {c['replicated']:,}"
        f"  per TP rank {c['per_tp_rank']:,}",
        f"  {'':<10} {'per rank':>14} {'x world':>14}",
    ]
    for key in ("params", "grads", "optimizer", "total"):
        lines.append(f"  {key:<10} {_mib(r[key]):>14} {_mib(r[key] * plan['world']):>14}")
    ratio = r["total"] / max(plan["total_bytes"], 1)
    lines.append(f"  single-device model states {_mib(plan['total_bytes'])}; per rank = {ratio:.3f} x that"
                 f" (ideal 1/world = {1 / plan['world']:.3f})")
    if "activations" in plan:
        lines.extend(format_activations(plan))
    for i, m in enumerate(measured or []):
        g = "-" if m["grads"] is None else _mib(m["grads"])
        lines.append(f"  measured rank {i}: params {_mib(m['params'])}, grads {g}, "
                     f"optimizer {_mib(m['optimizer'])}, total {_mib(m['total'])}")
    return "\n".join(lines)


def format_activations(plan: dict[str, Any]) -> list[str]:
    """Lines for the activation, workspace and fit entries (the `pretrain plan` table's second half)."""
    a, w = plan["activations"], plan["workspace"]
    per, parts = a["per_sample_bytes"], a["per_sample_parts"]
    e = a["bytes_per_element"]
    con, at = a["contrastive"], a["at_micro_batch_bytes"]
    lines = [f"activations per sample ({plan['precision']}: {e['residual']} B residual / {e['compute']} B "
             f"compute, attention {a['attention']}): {_mib(per['no_checkpointing'])} without checkpointing, "
             f"{_mib(per['checkpointing'])} with",
             "  " + ", ".join(f"{k} {_mib(v)}" for k, v in parts["no_checkpointing"].items()),
             f"  contrastive loss ({con['kind']}, {a['micro_batch']} rows x {con['columns_per_row']} "
             f"columns): {_mib(con['bytes_at_micro_batch'])}",
             f"  at micro-batch {a['micro_batch']}: {_mib(at['no_checkpointing'])} without checkpointing, "
             f"{_mib(at['checkpointing'])} with",
             f"workspace: {_mib(w['fixed_bytes'])} fixed + {w['activation_fraction']:.0%} of activations"
             + "".join(f" + {k} {_mib(v)}" for k, v in w["zero_buffers"].items())]
    f = plan.get("fit")
    if f:
        mx, cf = f["max_micro_batch"], f["configured"]
        lines.append(f"fit in {f['gpu_mem_bytes'] / GIB:g} GiB per device: largest micro-batch "
                     f"{mx['no_checkpointing']} without activation checkpointing, {mx['checkpointing']} with")
        lines.append(f"  configured micro-batch {cf['micro_batch']} (checkpointing "
                     f"{'on' if cf['activation_checkpointing'] else 'off'}): {_mib(cf['total_bytes'])} -> "
                     f"{'fits' if cf['fits'] else 'does NOT fit'}")
    return lines


# ------------------------------------------------------------------------------ training hooks
def log_startup_plan(cfg: Config, model: nn.Module, world: int, rank: int) -> dict[str, Any]:
    """Plan of the model this rank just built (its TP share); rank 0 logs the table."""
    plan = plan_for_model(cfg, model, world, built_tp=cfg.parallel.tp)
    if rank == 0:
        log.info("per-rank memory plan\n%s", format_plan(plan))
    return plan


def record_measured(engine: Any, plan: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """After the first optimizer step: every rank measures its model-state bytes; rank 0 logs them next
    to the plan and writes RUN_DIR/memory.json ({"plan": ..., "measured": [rank 0, rank 1, ...]})."""
    import torch.distributed as dist

    from parallel import groups
    from parallel.memory import measure_model_states

    mine = measure_model_states(engine)
    mine.update({"rank": groups.rank(), "tp_rank": groups.tp_rank(), "dp_rank": groups.dp_rank()})
    every: list[Any] = [mine]
    if groups.is_distributed() and groups.world_size() > 1:
        every = [None] * groups.world_size()
        dist.all_gather_object(every, mine)
    if groups.rank() == 0:
        log.info("measured model states after the first step\n%s", format_plan(plan, every))
        (Path(run_dir) / "memory.json").write_text(json.dumps({"plan": plan, "measured": every}, indent=1))
    return every


# ------------------------------------------------------------------------------------------ CLI
def cmd_plan(args: argparse.Namespace) -> int:
    from pretrain.cli import embedded_config_path

    cfg = load_config(args.config or embedded_config_path(), args.overrides)
    plan = memory_plan(cfg, args.world, gpu_mem_gb=args.gpu_mem)
    print(json.dumps(plan) if args.json else format_plan(plan), flush=True)
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """`pretrain plan`: hooked into the CLI through `pretrain.cli.REGISTRARS`."""
    p = sub.add_parser("plan", help="per-rank parameter, gradient and optimizer bytes for a layout, "
                                    "activations, and with --gpu-mem the largest micro-batch that fits "
                                    "(model built on the meta device; nothing is launched)")
    p.add_argument("--config", help="YAML recipe (default: the embedded configs/demo.yaml)")
    p.add_argument("--world", type=int, required=True, help="ranks to plan for (tp x dp)")
    p.add_argument("--gpu-mem", type=float, metavar="GB",
                   help="device memory in GiB: also print the largest micro-batch that fits with and without "
                        "activation checkpointing (model states + activations + workspace)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_plan)
