"""Communication volume per optimizer step: `pretrain plan --comm [--net-gbps G]`.

Bytes *each rank sends* per optimizer step for a layout (dp x tp, ZeRO stage, persistence threshold),
by collective, and the time this implies at G Gbit/s if nothing overlapped (an upper bound on what the
network adds to a step; NCCL and ZeRO's prefetch hide part of it behind compute).

Ring collectives over n ranks, S = bytes of the whole tensor: all-gather and reduce-scatter each send
(n-1)/n x S per rank, all-reduce 2(n-1)/n x S. With b = parameter bytes (2 bf16/fp16, 4 fp32 and
bf16_autocast), g = train.grad_accum, P = this TP rank's parameter elements, P_s the persistent ones
(ZeRO-3 keeps them whole: fewer elements than parallel.persistence_threshold), P_t the trainable ones:

    ZeRO-3  parameter all-gather   g x k x (P - P_s) x b x (dp-1)/dp    k = 1 when every partitioned
                                   parameter fits in DeepSpeed's live/reuse limits (stage3_max_live_
                                   parameters, stage3_max_reuse_distance; 1e9 elements by default): after
                                   the first, traced step the forward's gathers stay live through backward,
                                   measured on DeepSpeed 0.19; k = 2 (gathered again in backward) otherwise,
                                   within the zero_hpz group under hpZ (parallel/engine.py sets the limits
                                   to max(1e9, P) unless parallel.max_live_parameters says otherwise);
                                   qwZ (zero_quantized_weights) sends 1 byte per element (CUDA only,
                                   not measured); qgZ quantizes only across nodes and is not modelled
            persistent all-gather  P_s x b x (dp-1)/dp once per step (DeepSpeed's `_post_step`)
            gradient reduce-scatter g x P_t x b x (dp-1)/dp (every micro-batch, persistent ones included)
    ZeRO-1/2 gradient all-reduce   g x P_t x b x 2(dp-1)/dp: DeepSpeed 0.19 all-reduces each micro-batch's
                                   gradient buckets (use_multi_rank_bucket_allreduce; measured at stage 2
                                   on gloo; stage 1 is assumed the same, not measured), then all-gathers
                                   the updated partitions once per step: P x b x (dp-1)/dp
    ZeRO-0  gradient all-reduce    P_t x b x 2(dp-1)/dp at the boundary
    small   grad-norm / overflow all-reduces, a few bytes
    TP      megatron-core's row-parallel all-reduces: per block 2 in forward (attention and MLP outputs)
            and 2 in backward (column-parallel input gradients), + 2 recomputed in forward under
            activation checkpointing, each of tokens x width x activation bytes, x 2(tp-1)/tp; the text
            passes add the vocabulary-parallel embedding's forward all-reduce
    contrastive  features [B, E] gathered over dp with gradient (parallel/collectives.py): each gather
            sends (dp-1) x B x E x 4 (fp32 features) forward and its backward all-reduce of [dp B, E]
            sends 2(dp-1) x B x E x 4; two gathers for InfoNCE, one for SigLIP

What is checked against what (tests/e2e/test_plan_comm.py, 2 and 4 CPU ranks, gloo): the ZeRO rows
and `small` against DeepSpeed's comms logger (parallel/comms_probe.py says exactly what it records: the
*input* size of each op called through deepspeed.comm, which `logger_msg_bytes` predicts op by op).
The TP and contrastive rows go through torch.distributed directly, which the logger does not see: they
are analytic, from the shapes above.
"""

from __future__ import annotations

from typing import Any

from pretrain.config import Config
from pretrain.plan.flops import visible_patches

PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bf16_autocast": 4}
ACT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bf16_autocast": 2}
LIVE_DEFAULT = 10**9  # DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance defaults


def _tower_passes(cfg: Config) -> list[tuple[str, int, int, int]]:
    """(name, layers, width, tokens per sample) of every transformer pass in a training forward."""
    m, o = cfg.model, cfg.objectives
    v, t, d = m.vision, m.text, m.decoder
    use_con, use_mim, use_mlm = o.contrastive.weight > 0, o.mim.weight > 0, o.mlm.weight > 0
    n = (m.image_size // v.patch_size) ** 2
    if cfg.train.task == "classify":  # ClassifierModel: one image pass over every patch, nothing else
        return [("vision_full", v.layers, v.width, 1 + n)]
    out = []
    if use_con or use_mim:
        out.append(("vision", v.layers, v.width, 1 + visible_patches(n, o.mim.mask_ratio)))
    if use_con and use_mim and not o.mim.shared_pass:
        out.append(("vision_full", v.layers, v.width, 1 + n))
    if use_con:
        out.append(("text_causal", t.layers, t.width, t.context_length))
    if use_mim:
        out.append(("decoder", d.layers, d.width, 1 + n))
    if use_mlm:
        out.append(("text_mlm", t.layers, t.width, t.context_length))
    return out


def comm_plan(cfg: Config, counts: dict[str, int], world: int, net_gbps: float | None = None,
              live_limit: int | None = None) -> dict[str, Any]:
    """Bytes each rank sends per optimizer step, by collective (see the module docstring).

    `counts`: `pretrain.plan.memory.count_params` at this layout's persistence threshold."""
    p, tr = cfg.parallel, cfg.train
    tp = p.tp
    dp = world // tp
    b, a, g = PARAM_BYTES[tr.precision], ACT_BYTES[tr.precision], tr.grad_accum
    ring = (dp - 1) / dp
    mine = counts["per_tp_rank"]
    trainable = mine - counts.get("frozen_per_tp_rank", 0)
    persistent = counts["persistent_per_tp_rank"] if p.zero_stage == 3 else 0
    parts: dict[str, float] = {}
    msg: dict[str, float] = {}  # what DeepSpeed's comms logger records, by op (input bytes)
    if dp > 1:
        if p.zero_stage == 3:
            limit = live_limit or p.max_live_parameters or max(LIVE_DEFAULT, mine)  # parallel/engine.py
            k = 1 if mine - persistent <= limit else 2
            wb = 1 if p.zero_quantized_weights else b  # qwZ: int8 blocks (scales not counted)
            parts["zero3_param_allgather"] = g * (mine - persistent) * wb * ring
            if k == 2:  # gathered again in backward; under hpZ inside the zero_hpz group (the node)
                h = p.zero_hpz if p.zero_hpz > 1 else dp
                parts["zero3_param_allgather_backward"] = g * (mine - persistent) * wb * (h - 1) / h
            parts["zero3_persistent_allgather"] = persistent * b * ring
            parts["zero_grad_reduce_scatter"] = g * trainable * b * ring
            msg["all_gather_into_tensor"] = (g * k * (mine - persistent) + persistent) * b / dp
            msg["reduce_scatter_tensor"] = g * trainable * b
            parts["small_allreduces"] = 2 * 8 * 2 * ring  # grad norm and overflow flag (fp64 scalars)
            msg["all_reduce"] = 2 * 8
        elif p.zero_stage in (1, 2):
            parts["zero12_grad_allreduce"] = g * trainable * b * 2 * ring
            parts["zero12_param_allgather"] = mine * b * ring
            parts["small_allreduces"] = 4 * 2 * ring
            msg["all_reduce"] = g * trainable * b + 4
            msg["all_gather_into_tensor"] = mine * b / dp
        else:  # at the boundary only (the engine's allreduce_gradients), one bucket stream
            parts["grad_allreduce"] = trainable * b * 2 * ring
            msg["all_reduce"] = trainable * b + 4
    if tp > 1:
        ar = 2 * (tp - 1) / tp
        per_block = 4 + (2 if tr.activation_checkpointing else 0)
        act = sum(layers * per_block * tokens * width for _, layers, width, tokens in _tower_passes(cfg))
        texts = sum(1 for name, *_ in _tower_passes(cfg) if name.startswith("text"))
        act += texts * cfg.model.text.context_length * cfg.model.text.width  # vocab-parallel embedding
        parts["tp_activation_allreduce"] = g * tr.micro_batch * act * a * ar
    o = cfg.objectives
    if dp > 1 and o.contrastive.weight > 0 and cfg.train.task != "classify":  # classify: no such loss
        gathers = 1 if o.contrastive.loss == "siglip" else 2
        feat = tr.micro_batch * cfg.model.embed_dim * 4
        parts["contrastive_feature_gather"] = g * gathers * ((dp - 1) * feat + 2 * (dp - 1) * feat)
    parts = {k: round(v) for k, v in parts.items()}
    total = sum(parts.values())
    out: dict[str, Any] = {"world": world, "dp": dp, "tp": tp, "zero_stage": p.zero_stage,
                           "grad_accum": g, "bytes_per_param": b, "per_rank_bytes": parts,
                           "total_bytes": total, "logger_msg_bytes": {k: round(v) for k, v in msg.items()}}
    if net_gbps is not None:
        out["net_gbps"] = net_gbps
        out["seconds_at_net"] = total * 8 / (net_gbps * 1e9)
    return out


def format_comm(plan: dict[str, Any]) -> str:
    """The human-readable table of `comm_plan`."""
    lines = [f"communication per optimizer step, per rank: world {plan['world']} = tp {plan['tp']} x dp "
             f"{plan['dp']}, ZeRO-{plan['zero_stage']}, grad_accum {plan['grad_accum']}"]
    for k, v in plan["per_rank_bytes"].items():
        lines.append(f"  {k:<30} {v / 2**20:12.3f} MiB")
    lines.append(f"  {'total sent':<30} {plan['total_bytes'] / 2**20:12.3f} MiB")
    if "seconds_at_net" in plan:
        lines.append(f"  at {plan['net_gbps']:g} Gbit/s, no overlap: {plan['seconds_at_net'] * 1e3:.1f} ms")
    return "\n".join(lines)
