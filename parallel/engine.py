"""DeepSpeed engine construction: the one place that turns our config into a DeepSpeed config."""

from __future__ import annotations

import math
from typing import Any

import torch

from parallel import comms_probe, optimizers
from parallel import param_groups as _param_groups
from parallel.settings import EngineSpec, ParallelConfig


def lr_lambda(spec: EngineSpec):
    """Multiplier of `optim.lr` at a step: linear warm-up, then cosine (or constant) decay."""
    warm, total, floor = spec.optim.warmup_steps, spec.steps, spec.optim.min_lr_ratio

    def fn(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if spec.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


LIVE_DEFAULT = 10**9
"""DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance defaults (elements)."""


REDUCE_DEFAULT, PREFETCH_DEFAULT = 500_000_000, 50_000_000  # DeepSpeed's own defaults (elements)


def zero3_tuning(p: ParallelConfig, hidden: int, model_params: int) -> dict[str, int]:
    """ZeRO bucket and liveness sizes for this model, each an explicit `parallel.*` setting when given.

    The rule, from the widest tower's width W and the parameter count P of this TP rank: reduce bucket
    max(W^2, min(P, 5e8)) and ZeRO-3 prefetch bucket max(0.9 W^2, min(P, 5e7)) -- DeepSpeed's `auto`
    values (W^2, 0.9 W^2) as the floor, but never smaller than the model while it fits DeepSpeed's default
    bucket: measured on 2 CPU ranks, a tiny model (W 64, P 270k) trains 4x slower with W^2-sized buckets
    (many small gathers, prefetch effectively off) than with one bucket. Persistence threshold 10 W when
    `parallel.persistence_threshold=-1` (biases, norms and vectors stay whole; matrices are partitioned),
    max live parameters and reuse distance max(1e9, P): below that DeepSpeed releases parameters after
    their forward and gathers them again in backward (`pretrain plan --comm` counts both cases). `hidden`
    or `model_params` 0: what they derive falls back to the other, or to DeepSpeed's defaults."""
    out: dict[str, int] = {}
    if p.reduce_bucket_size or hidden or model_params:
        floor = min(model_params, REDUCE_DEFAULT)
        out["reduce_bucket_size"] = p.reduce_bucket_size or max(hidden * hidden, floor)
    if p.prefetch_bucket_size or hidden or model_params:
        floor = min(model_params, PREFETCH_DEFAULT)
        out["stage3_prefetch_bucket_size"] = p.prefetch_bucket_size or max(int(0.9 * hidden * hidden), floor)
    threshold = p.persistence_threshold if p.persistence_threshold >= 0 else 10 * hidden
    out["stage3_param_persistence_threshold"] = threshold
    live = p.max_live_parameters or max(LIVE_DEFAULT, model_params)
    out["stage3_max_live_parameters"] = out["stage3_max_reuse_distance"] = live
    return out


def deepspeed_config(spec: EngineSpec, dp_world: int, impl: str | None = None,
                     model_params: int = 0) -> dict[str, Any]:
    """DeepSpeed JSON config for this run (also written to RUN_DIR/ds_config.json for reference).

    `impl` is the resolved `optim.impl` (default: resolved here). torch_fused / apex_fused are client
    optimizers (see `build_engine`), so their config has no `optimizer` section; cpu_adam adds ZeRO's
    optimizer offload. Precision: bf16 = bf16 parameters with fp32 master weights; fp16 = dynamic loss
    scaling; bf16_autocast = fp32 parameters, bf16 compute under DeepSpeed's `torch_autocast`.
    """
    t, o, p = spec, spec.optim, spec.parallel
    impl = impl or optimizers.resolve_impl(o.impl)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    tuning = zero3_tuning(p, spec.hidden, model_params)
    if p.zero_stage in (1, 2) and "reduce_bucket_size" in tuning:
        zero["reduce_bucket_size"] = tuning["reduce_bucket_size"]
    if p.zero_stage == 3:
        zero.update({**tuning, "overlap_comm": True, "contiguous_gradients": True})
        if p.zero_hpz > 1:
            zero["zero_hpz_partition_size"] = p.zero_hpz
        if p.zero_quantized_weights:
            zero["zero_quantized_weights"] = True
        if p.zero_quantized_gradients:
            zero["zero_quantized_gradients"] = True
    offload = optimizers.offload_section(impl)
    if offload is not None:
        zero["offload_optimizer"] = offload
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
    }
    section = optimizers.deepspeed_optimizer_section(impl, o)
    if section is not None:
        ds["optimizer"] = section
    ds.update({
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": t.fp16_initial_scale_power,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    })
    if t.precision == "bf16_autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    probe = comms_probe.logger_section()  # MMPT_COMMS_LOG: tests of `pretrain plan --comm`
    if probe is not None:
        ds["comms_logger"] = probe
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_mult: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, embeddings, tokens and the logit scale are exempt (CLIP); frozen
    parameters are left out; `lr_mult` splits groups by learning-rate multiplier (parallel/param_groups)."""
    return _param_groups.param_groups(model, weight_decay, lr, lr_mult)


def build_engine(spec: EngineSpec, model: torch.nn.Module, dp_world: int):
    """Wrap `model` (already prepared by `pretrain.parallelize`) in a DeepSpeed engine with AdamW
    (`optim.impl`), our LR schedule, ZeRO and mixed precision.

    Once megatron-core's groups exist (`groups.init_distributed`), DeepSpeed gets the `mpu` adapter:
    ZeRO then partitions, reduces gradients and broadcasts start-up weights over the data-parallel group
    only (each TP rank keeps its own shards), and grad norms / overflow checks sum over the TP group
    counting split parameters on every rank and replicated ones once. With tp > 1 the per-TP-rank
    dropout stream is seeded here, before the first forward. Returns (engine, DeepSpeed config dict).
    """
    import deepspeed

    from parallel import groups, rng
    from parallel.mpu import MegatronMPU

    mpu = MegatronMPU() if groups.get_data_parallel_group() is not None else None
    if groups.tp_size() > 1:
        rng.seed_tensor_parallel_rng(spec.seed, groups.tp_rank())
    impl = optimizers.resolve_impl(spec.optim.impl)
    ds_cfg = deepspeed_config(spec, dp_world, impl, sum(q.numel() for q in model.parameters()))
    schedule = lr_lambda(spec)
    with optimizers.deepspeed_arch_list():  # FusedAdam may be JIT-built in here
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, spec.optim.weight_decay, spec.optim.lr, spec.optim.lr_mult),
            optimizer=optimizers.client_optimizer(impl, spec.optim),
            config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            mpu=mpu,
        )
    _link_fp32_masters(optimizer)
    _undo_state_init_step(optimizer)
    if spec.compile_model:  # after initialize: ZeRO-3's gathers are hooks the compiled forward calls eagerly
        engine.compile()
    return engine, ds_cfg


def ceiling_in(dtype: torch.dtype, max_value: float) -> float:
    """The clamp bound for a tensor of `dtype` that keeps it at most `max_value`: `max_value` itself for fp32
    and wider (unchanged behaviour), else the largest `dtype` value <= `max_value`. A bf16/fp16 clamp to
    `max_value` stores its round-to-nearest, which can be ABOVE it (bf16(log 200) = 5.3125 > 5.2983: the
    forward would see a scale of 202.9 under a ceiling of 200); a bound the dtype holds exactly cannot."""
    if torch.finfo(dtype).bits >= 32:
        return max_value
    c = torch.tensor(max_value, dtype=torch.float64).to(dtype)
    if float(c) > max_value:  # rounded up: step down to the neighbour below
        c = torch.nextafter(c, torch.tensor(-math.inf, dtype=dtype))
    return float(c)


def _link_fp32_masters(optimizer: Any) -> None:
    """ZeRO 0 under bf16/fp16: DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer keep fp32 masters that
    `safe_get_full_fp32_param` does not reach (it returns None), so `clamp_parameter_` would clamp only the
    working copy while the master the optimizer updates climbs past the ceiling, and the scale could not come
    back down until it had climbed back. Record on each parameter a view of its master (both optimizers
    update and load their masters in place, so the view stays live)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            for lp, hp in zip(lps, hps, strict=True):
                lp._mmpt_fp32_master = hp
    elif isinstance(optimizer, FP16_Optimizer):
        for lps, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True):
            offset = 0
            for lp in lps:
                lp._mmpt_fp32_master = flat.detach().narrow(0, offset, lp.numel()).view_as(lp)
                offset += lp.numel()


@torch.no_grad()
def _undo_state_init_step(optimizer: Any) -> None:
    """ZeRO 0 under bf16/fp16: DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer create the inner
    optimizer's state by stepping it once with zero gradients at construction. For Adam that is not a
    no-op: its step count starts at 1, so every early update is bias-corrected for one step too many (the
    first real update is 0.74x what ZeRO 1-3 and fp32 take with betas 0.9/0.98), and decoupled weight decay
    has shrunk the masters once at the base lr. Measured: the step-2 loss of a bf16 ZeRO-0 run was 0.17
    away from ZeRO-1's. Undone here: each fp32 master is set back to its working copy, from which DeepSpeed
    made it (an exact fp32 copy of the bf16/fp16 value), and the inner state is cleared, so the first real
    step starts it as every other stage does. Call after `_link_fp32_masters`."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_Optimizer | FP16_UnfusedOptimizer):
        return
    for group in optimizer.fp16_groups:
        for lp in group:
            lp._mmpt_fp32_master.copy_(lp.detach().float())
    inner = optimizer.optimizer
    inner.state.clear()  # torch's AdamW and DeepSpeed's FusedAdam create it again on their first step
    for group in inner.param_groups:
        group.pop("step", None)  # FusedAdam's per-group count (its per-parameter one starts from it)


@torch.no_grad()
def clamp_parameter_(param: torch.nn.Parameter, max_value: float) -> None:
    """Clamp `param` in place after an optimizer step (CLIP's logit-scale ceiling), under any ZeRO stage and
    precision: in the fp32 master copy the optimizer updates (bf16/fp16 at any stage) and in the
    working copy the forward reads. Every rank calls it. Under ZeRO-3 each rank clamps its own partitions
    (the clamp is elementwise: no communication); no host sync anywhere.

    The master is clamped to `max_value`; a bf16/fp16 working copy to the largest value of its dtype at most
    `max_value` (`ceiling_in`), so the value the forward reads never exceeds the ceiling."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if not param.requires_grad:  # frozen (`train.freeze`): no optimizer copy, and it never moves
        return
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's fp32 partition and working partition
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(max=max_value))
        param.ds_tensor.data.clamp_(max=ceiling_in(param.ds_tensor.dtype, max_value))
    elif (master := safe_get_full_fp32_param(param)) is not None:  # ZeRO 1-2, bf16/fp16 optimizers
        safe_set_full_fp32_param(param, master.clamp(max=max_value))
    elif (master := getattr(param, "_mmpt_fp32_master", None)) is not None:  # ZeRO 0, bf16/fp16
        master.clamp_(max=max_value)
    if param.data.numel():  # the working copy the forward reads (ZeRO-3: a persistent parameter)
        param.data.clamp_(max=ceiling_in(param.dtype, max_value))
