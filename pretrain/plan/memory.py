"""Per-rank model-state memory: `pretrain plan --config FILE --world N` and the training start-up report.

The plan builds the model on the meta device (no memory, no process groups), counts every parameter as
split over tensor-parallel ranks or replicated (as `pretrain.parallelize.TP_PLAN` says, at any tp), and
applies ZeRO stage s over the data-parallel degree
dp = world / tp:

    frozen parameters     (`train.freeze`) parameter bytes only: no gradient, no master, no moments
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
there and in `block_activation_bytes`, in `pretrain/plan/activations.py`). JSON keys added by the plan CLI:

    task          train.task: `pretrain` plans PretrainModel (and adds vocab_padded), `classify` the
                  ClassifierModel fine-tuning builds (image tower + head; adds num_classes)
    activations   bytes_per_element {residual, compute}, attention, tokens {vision, text, decoder},
                  per_sample_bytes {no_checkpointing, checkpointing} and per_sample_parts {same: {part:
                  bytes}}, phase {same: masked | unmasked_tail | classify: the forward those parts are
                  of, the larger one with objectives.mim.unmasked_tail_steps}, contrastive {kind,
                  columns_per_row, bytes_at_micro_batch}, micro_batch, at_micro_batch_bytes {no_checkpointing,
                  checkpointing}
    workspace     fixed_bytes, activation_fraction, zero_buffers_bytes, zero_buffers {name: bytes}
    comm          (only with --comm / --net-gbps) pretrain/plan/comm.py: per_rank_bytes {collective: bytes},
                  total_bytes, logger_msg_bytes, seconds_at_net
    fit           (only with --gpu-mem) gpu_mem_bytes, max_micro_batch {no_checkpointing, checkpointing},
                  configured {micro_batch, activation_checkpointing, total_bytes, fits}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import Config, load_config, validate
from pretrain.plan.activations import GIB, activation_plan, fit_plan

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
    from pretrain.parallelize import tp_split_dims

    dims = tp_split_dims(model)
    total = split = per_rank = persistent = frozen = frozen_per_rank = 0
    for name, p in model.named_parameters():
        local = int(getattr(p, "ds_numel", 0)) or p.numel()  # ZeRO-3 empties .data; ds_numel keeps size
        dim = dims[name]
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
        if not p.requires_grad:  # `train.freeze`: held and saved, but no gradient and no optimizer state
            frozen += full
            frozen_per_rank += mine
    return {"total": total, "split": split, "replicated": total - split, "per_tp_rank": per_rank,
            "persistent_per_tp_rank": persistent, "frozen": frozen, "frozen_per_tp_rank": frozen_per_rank}


def bytes_per_rank(counts: dict[str, int], precision: str, zero_stage: int, dp: int) -> dict[str, int]:
    """Model-state bytes one rank holds (see the module docstring for the accounting)."""
    pb, gb, ob = bytes_per_param(precision, zero_stage)
    mine, keep = counts["per_tp_rank"], counts["persistent_per_tp_rank"] if zero_stage == 3 else 0
    trainable = mine - counts.get("frozen_per_tp_rank", 0)  # frozen: no gradient, no optimizer state
    # ZeRO-3: every parameter's 1/dp partition, plus a whole copy of each persistent one
    params = pb * (keep + mine / dp) if zero_stage == 3 else pb * mine
    grads = gb * trainable / (dp if zero_stage >= 2 else 1)
    optimizer = ob * trainable / (dp if zero_stage >= 1 else 1)
    out = {"params": round(params), "grads": round(grads), "optimizer": round(optimizer)}
    out["total"] = sum(out.values())
    return out


def plan_for_model(cfg: Config, model: nn.Module, world: int, built_tp: int = 1) -> dict[str, Any]:
    """The memory plan of `model` (single-device or one TP rank's) trained with `cfg` on `world` ranks."""
    tp = cfg.parallel.tp
    dp = world // tp
    p = cfg.parallel
    from parallel.engine import zero3_tuning

    hidden = max(cfg.model.vision.width, cfg.model.text.width)  # persistence_threshold=-1: derived
    threshold = zero3_tuning(p, hidden, 0)["stage3_param_persistence_threshold"] if p.zero_stage == 3 else 0
    counts = count_params(model, tp, built_tp, threshold)
    pb, gb, ob = bytes_per_param(cfg.train.precision, p.zero_stage)
    return {
        "world": world, "tp": tp, "dp": dp, "zero_stage": p.zero_stage, "precision": cfg.train.precision,
        "params": counts,
        "bytes_per_param": {"params": pb, "grads": gb, "optimizer": ob},
        "per_rank_bytes": bytes_per_rank(counts, cfg.train.precision, p.zero_stage, dp),
        # the single-device model, same accounting (frozen parameters: the parameter bytes only)
        "total_bytes": counts["total"] * (pb + gb + ob) - counts["frozen"] * (gb + ob),
    }


def plan_vocab_size(cfg: Config) -> int:
    """The configured tokenizer's size, else `data.vocab_size` (the most a trained tokenizer can have)."""
    if cfg.data.tokenizer:
        from data_pipelines.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer).vocab_size
    return cfg.data.vocab_size


def memory_plan(cfg: Config, world: int, gpu_mem_gb: float | None = None) -> dict[str, Any]:
    """Plan for `cfg` on `world` ranks without launching anything: the model is built on the meta device
    (single-device layout; split parameters are named by `pretrain.parallelize.tp_split_dims`). Includes
    the activation and workspace estimate, and with `gpu_mem_gb` the largest micro-batch that fits (`fit`)."""
    from parallel.groups import tp_size

    check_plan_numbers(world, gpu_mem_gb)
    validate(cfg, world_size=world)
    if tp_size() != 1:
        raise RuntimeError("memory_plan builds the single-device layout; call it outside a TP run "
                           "(inside one, use plan_for_model with the rank's model)")
    from pretrain.freeze import apply_freeze

    model = plan_model(cfg)
    apply_freeze(model, cfg)  # `train.freeze`: those parameters get no gradient or optimizer bytes
    plan = plan_for_model(cfg, model, world)
    plan["task"] = cfg.train.task
    if cfg.train.task == "classify":
        plan["num_classes"] = model.num_classes
    else:
        plan["vocab_padded"] = model.vocab_size
    plan.update(activation_plan(cfg, model, plan))
    if gpu_mem_gb is not None:
        plan["fit"] = fit_plan(plan, cfg, gpu_mem_gb)
    return plan


def plan_model(cfg: Config) -> nn.Module:
    """The model training builds for `train.task`, on the meta device: `PretrainModel`, or for `classify`
    the `ClassifierModel` fine-tuning builds (image tower + a head over `finetune.classnames`, which is
    read here: FileNotFoundError / ValueError naming it), so the plan counts what that run holds."""
    if cfg.train.task == "classify":
        from pretrain.models.classifier import ClassifierModel
        from pretrain.tasks.classify import classnames_of

        classes = len(classnames_of(cfg))
        with torch.device("meta"):
            return ClassifierModel.from_config(cfg, classes)
    from pretrain.models.pretrain_model import PretrainModel

    with torch.device("meta"):
        return PretrainModel.from_config(cfg, vocab_size=plan_vocab_size(cfg))


def check_plan_numbers(world: int, gpu_mem_gb: float | None = None, net_gbps: float | None = None) -> None:
    """ValueError naming the flag for a layout or device that cannot exist (`pretrain plan` would divide
    by zero, print negative bytes, or drop a table silently otherwise)."""
    if world < 1:
        raise ValueError(f"--world must be >= 1 (ranks), got {world}")
    for flag, value, unit in (("--gpu-mem", gpu_mem_gb, "GiB per device"),
                              ("--net-gbps", net_gbps, "Gbit/s")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be > 0 and finite ({unit}), got {value}")


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
    if c.get("frozen"):
        lines.insert(2, f"  frozen (train.freeze) {c['frozen']:,} ({c['frozen'] / max(c['total'], 1):.1%}): "
                        f"parameter bytes only, no gradient or optimizer state; per TP rank "
                        f"{c['frozen_per_tp_rank']:,}")
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
             "  " + ", ".join(f"{k} {_mib(v)}" for k, v in parts["no_checkpointing"].items())]
    phase = a.get("phase", {})
    if "unmasked_tail" in phase.values():  # objectives.mim.unmasked_tail_steps: the larger phase is shown
        lines.append("  the larger phase (objectives.mim.unmasked_tail_steps): "
                     + ", ".join(f"{k.replace('_', ' ')}: {v.replace('_', ' ')}" for k, v in phase.items()))
    if plan.get("task") == "classify":
        lines.append(f"  classify: image tower + head over {plan['num_classes']} classes (no text tower, "
                     "decoder or contrastive loss)")
    else:
        lines.append(f"  contrastive loss ({con['kind']}, {a['micro_batch']} rows x {con['columns_per_row']} "
                     f"columns): {_mib(con['bytes_at_micro_batch'])}")
    lines += [f"  at micro-batch {a['micro_batch']}: {_mib(at['no_checkpointing'])} without checkpointing, "
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
    from pretrain.config import embedded_config_path

    check_plan_numbers(args.world, args.gpu_mem, args.net_gbps)  # before the config: one line, no table
    cfg = load_config(args.config or embedded_config_path(), args.overrides)
    plan = memory_plan(cfg, args.world, gpu_mem_gb=args.gpu_mem)
    text = format_plan(plan)
    if args.comm or args.net_gbps is not None:  # bytes each rank sends per step (pretrain/plan/comm.py)
        from pretrain.plan.comm import comm_plan, format_comm

        plan["comm"] = comm_plan(cfg, plan["params"], args.world, net_gbps=args.net_gbps)
        text += "\n" + format_comm(plan["comm"])
    print(json.dumps(plan) if args.json else text, flush=True)
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
    p.add_argument("--comm", action="store_true",
                   help="also print the bytes each rank sends per optimizer step, by collective (ZeRO "
                        "gathers and reductions, TP all-reduces, contrastive gathers; JSON key `comm`)")
    p.add_argument("--net-gbps", type=float, metavar="G",
                   help="network bandwidth in Gbit/s: also print the time the communication takes at it "
                        "without overlap (implies --comm)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_plan)
