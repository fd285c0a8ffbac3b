"""All-at-once validation: every problem of a config in one `ConfigError`, each naming its key.

`validate` is machine-independent (a GPU recipe still loads on a laptop for eval or planning);
`check_runtime` is the machine-dependent part, called where training starts.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

from data_pipelines.urls import split_sources
from launch.ports import is_tcp_port
from pretrain.config.schedule import schedule_problems, schedule_warnings, warn_once
from pretrain.config.schema import CHOICES, Config, ConfigError


def validate(cfg: Config, world_size: int | None = None, schedule: bool = True) -> None:
    """Check ranges, choices and divisibility; raise one ConfigError listing every problem. `schedule=False`
    (a config stored in a checkpoint) skips the checks and warnings of pretrain/config/schedule.py, which
    are about a run about to start, so checkpoints saved before one of them existed still load."""
    problems: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        check(value in choices, f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    problems += _nonfinite_problems(cfg, "")
    m = cfg.model
    check(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    check(m.image_size > 0 and m.vision.patch_size > 0 and m.image_size % m.vision.patch_size == 0,
          f"model.image_size ({m.image_size}) must be a positive multiple of "
          f"model.vision.patch_size ({m.vision.patch_size})")
    for name, tower in (("vision", m.vision), ("text", m.text), ("decoder", m.decoder)):
        check(tower.width > 0 and tower.heads > 0 and tower.width % tower.heads == 0,
              f"model.{name}.heads ({tower.heads}) must divide model.{name}.width ({tower.width})")
        check(tower.layers >= 1, f"model.{name}.layers must be >= 1")
    check(m.text.context_length >= 4, "model.text.context_length must be >= 4")
    check(m.embed_dim > 0, "model.embed_dim must be > 0")
    check(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    check(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout must be in [0, 1)")
    check(m.vocab_pad_multiple >= 1, "model.vocab_pad_multiple must be >= 1")
    o = cfg.objectives
    for name in ("contrastive", "mim", "mlm", "itm"):
        check(getattr(o, name).weight >= 0, f"objectives.{name}.weight must be >= 0")
    check(o.contrastive.weight + o.mim.weight + o.mlm.weight + o.itm.weight > 0,
          "at least one of objectives.{contrastive,mim,mlm,itm}.weight must be > 0")
    f = m.fusion
    check(f.layers >= 0, "model.fusion.layers must be >= 0 (0: off)")
    check(f.width >= 0, "model.fusion.width must be >= 0 (0: the text tower's width)")
    fw = f.width or m.text.width
    check(f.layers == 0 or (f.heads > 0 and fw % f.heads == 0),
          f"model.fusion.heads ({f.heads}) must divide the fusion width ({fw})")
    check(o.itm.weight == 0 or f.layers > 0, "objectives.itm.weight > 0 needs model.fusion.layers > 0")
    check(not f.text_positions or f.layers > 0,
          "model.fusion.text_positions=true needs model.fusion.layers > 0")
    check(not f.image_positions or f.layers > 0,
          "model.fusion.image_positions=true needs model.fusion.layers > 0")
    check(o.itm.weight == 0 or o.contrastive.weight > 0,
          "objectives.itm.weight > 0 needs objectives.contrastive.weight > 0 (hard negatives are mined from "
          "the contrastive similarities)")
    check(not o.mlm.conditioned or f.layers > 0,
          "objectives.mlm.conditioned=true needs model.fusion.layers > 0")
    check(not o.mlm.conditioned or o.mlm.weight > 0,
          "objectives.mlm.conditioned=true needs objectives.mlm.weight > 0")
    check(0.0 <= o.mim.mask_ratio < 1.0, "objectives.mim.mask_ratio must be in [0, 1)")
    check(not (o.mim.weight > 0 and o.mim.mask_ratio == 0),
          "objectives.mim.mask_ratio must be > 0 when objectives.mim.weight > 0")
    check(o.mim.norm_pix_eps > 0, "objectives.mim.norm_pix_eps must be > 0")
    check(o.mim.target in ("pixels", "features"),
          f"objectives.mim.target must be pixels or features, got {o.mim.target!r}")
    check(not (o.mim.weight > 0 and o.mim.target == "features" and o.mim.shared_pass),
          "objectives.mim.target=features needs objectives.mim.shared_pass=false (the full-image pass of the "
          "contrastive loss is its target)")
    grid = cfg.model.image_size // cfg.model.vision.patch_size
    check(o.mim.mask_layout != "spread" or grid % 2 == 0,
          f"objectives.mim.mask_layout=spread needs an even number of patches per side, got {grid} "
          "(model.image_size / model.vision.patch_size)")
    check(o.mim.unmasked_tail_steps >= 0, "objectives.mim.unmasked_tail_steps must be >= 0 (0: off)")
    check(o.itm.caption_negatives_per_step >= 1, "objectives.itm.caption_negatives_per_step must be >= 1")
    check(o.itm.caption_negatives_per_step == 1 or o.itm.caption_negatives,
          "objectives.itm.caption_negatives_per_step > 1 needs objectives.itm.caption_negatives=true")
    check(o.itm.alone_steps >= 0, "objectives.itm.alone_steps must be >= 0 (0: every negative at once)")
    check(o.itm.alone_steps == 0 or (o.itm.caption_negatives and o.itm.weight > 0),
          "objectives.itm.alone_steps > 0 needs objectives.itm.caption_negatives=true and "
          "objectives.itm.weight > 0 (it scores one neg.txt line alone)")
    check(o.itm.skew_steps >= 0, "objectives.itm.skew_steps must be >= 0 (0: off)")
    check(o.itm.skew_steps == 0 or (o.itm.skew_phrase.strip() and o.itm.weight > 0),
          "objectives.itm.skew_steps > 0 needs objectives.itm.skew_phrase (the text whose captions dominate) "
          "and objectives.itm.weight > 0")
    check(o.itm.skew_weight >= 0, f"objectives.itm.skew_weight must be >= 0, got {o.itm.skew_weight}")
    k = o.itm.caption_negatives_per_step
    check(0 <= o.itm.alone_line < k,
          f"objectives.itm.alone_line ({o.itm.alone_line}) must be one of the {k} lines scored per step "
          f"(objectives.itm.caption_negatives_per_step): 0 to {k - 1}")
    check(o.itm.hard_warmup_steps >= 0, "objectives.itm.hard_warmup_steps must be >= 0 (0: hard negatives "
          "from the first step)")
    check(o.mim.unmasked_tail_steps <= cfg.train.steps,
          f"objectives.mim.unmasked_tail_steps ({o.mim.unmasked_tail_steps}) must be <= train.steps "
          f"({cfg.train.steps})")
    check(0.0 < o.mlm.mask_prob < 1.0, "objectives.mlm.mask_prob must be in (0, 1)")
    check(o.contrastive.init_temperature > 0, "objectives.contrastive.init_temperature must be > 0")
    check(o.contrastive.max_logit_scale > 0, "objectives.contrastive.max_logit_scale must be > 0 (the cap on "
          f"1 / temperature), got {o.contrastive.max_logit_scale}")
    check(o.contrastive.chunk >= 0, "objectives.contrastive.chunk must be >= 0 (0: plain loss)")
    t = cfg.train
    check(t.steps >= 1, "train.steps must be >= 1")
    check(t.micro_batch >= 1, "train.micro_batch must be >= 1")
    check(t.grad_accum >= 1, "train.grad_accum must be >= 1")
    check(t.grad_clip >= 0, "train.grad_clip must be >= 0")
    check(0 <= t.fp16_initial_scale_power <= 32, "train.fp16_initial_scale_power must be in [0, 32]")
    check(t.global_batch >= 0, "train.global_batch must be >= 0")
    check(t.nonfinite_patience >= 1, "train.nonfinite_patience must be >= 1")
    check(t.stop_check_every >= 0, "train.stop_check_every must be >= 0 (0: at log steps)")
    check(all(p.strip() for p in t.freeze), "train.freeze: patterns must be non-empty strings")
    check(len(set(t.freeze)) == len(t.freeze), f"train.freeze: a pattern is listed twice in {t.freeze}")
    check(not t.fp8 or (t.precision == "bf16" and cfg.parallel.tp == 1),
          f"train.fp8=true needs train.precision=bf16 and parallel.tp=1 (got {t.precision}, tp "
          f"{cfg.parallel.tp}): fp8 replaces bf16 matmuls in plain nn.Linear layers, which megatron-core's "
          f"tensor-parallel layers are not")
    check(t.task != "classify" or bool(cfg.finetune.classnames.strip()),
          "train.task=classify needs finetune.classnames: the classnames.txt the .cls labels index "
          "(`pretrain finetune --classnames FILE`)")
    if world_size is not None and t.global_batch and world_size % max(cfg.parallel.tp, 1) == 0:
        dp = world_size // max(cfg.parallel.tp, 1)
        check(t.global_batch == t.micro_batch * t.grad_accum * dp,
              f"train.global_batch ({t.global_batch}) != train.micro_batch ({t.micro_batch}) x "
              f"train.grad_accum ({t.grad_accum}) x data-parallel ranks ({dp} = world {world_size} / "
              f"tp {cfg.parallel.tp})")
    op = cfg.optim
    check(op.lr > 0, "optim.lr must be > 0")
    check(op.eps > 0, f"optim.eps must be > 0, got {op.eps}")
    check(op.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {op.weight_decay}")
    check(0 <= op.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    check(op.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    check(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas),
          "optim.betas must be two numbers in [0, 1)")
    check(all(k.strip() for k in op.lr_mult), "optim.lr_mult: patterns must be non-empty strings")
    bad_mult = {k: v for k, v in op.lr_mult.items() if not (math.isfinite(v) and v >= 0)}
    check(not bad_mult, f"optim.lr_mult: multipliers must be finite and >= 0, got {bad_mult}")
    pa = cfg.parallel
    check(pa.persistence_threshold >= -1, "parallel.persistence_threshold must be >= 0, or -1 (derived)")
    for key in ("prefetch_bucket_size", "reduce_bucket_size", "max_live_parameters"):
        check(getattr(pa, key) >= 0, f"parallel.{key} must be >= 0 (0: derived from the model)")
    check(pa.zero_hpz >= 1, "parallel.zero_hpz must be >= 1 (1: off)")
    zpp = [k for k in ("zero_quantized_weights", "zero_quantized_gradients") if getattr(pa, k)]
    zpp += ["zero_hpz"] if pa.zero_hpz > 1 else []
    check(not zpp or pa.zero_stage == 3, f"parallel.{', parallel.'.join(zpp)} (ZeRO++) need "
          f"parallel.zero_stage=3 (got {pa.zero_stage})")
    if world_size is not None and pa.zero_hpz > 1 and world_size % max(pa.tp, 1) == 0:
        dp = world_size // max(pa.tp, 1)
        check(dp % pa.zero_hpz == 0, f"parallel.zero_hpz ({pa.zero_hpz}) must divide the data-parallel "
              f"degree ({dp} = {world_size} ranks / tp {pa.tp})")
    check(op.impl != "cpu_adam" or cfg.parallel.zero_stage >= 1,
          f"optim.impl=cpu_adam offloads the optimizer through ZeRO: it needs parallel.zero_stage >= 1 "
          f"(got {cfg.parallel.zero_stage})")
    d = cfg.data
    check(d.workers >= 0, "data.workers must be >= 0")
    check(d.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
    check(d.interleave >= 1, "data.interleave must be >= 1")
    check(d.sampling in ("epoch", "resampled"),
          f"data.sampling: {d.sampling!r} is not one of epoch, resampled")
    check(all(w > 0 for w in d.train_weights), "data.train_weights must all be > 0")
    check(not d.train_weights or d.sampling == "resampled",
          "data.train_weights needs data.sampling=resampled (epoch sampling reads every sample once)")
    if d.train_weights and d.train:
        sources = len(split_sources(d.train))
        check(len(d.train_weights) == sources,
              f"data.train_weights has {len(d.train_weights)} entries but data.train has {sources} "
              f"'::'-separated source(s)")
    check(d.max_image_pixels >= 0, "data.max_image_pixels must be >= 0 (0: no limit)")
    check(d.max_sample_bytes >= 0, "data.max_sample_bytes must be >= 0 (0: no limit)")
    check(0 < d.max_bad_fraction <= 1, "data.max_bad_fraction must be in (0, 1]")
    check(d.bad_check_after >= 0, "data.bad_check_after must be >= 0")
    check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
          "data.crop_scale must be [min, max] with 0 < min <= max <= 1")
    check(len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
          "data.mean and data.std must have 3 entries (std > 0)")
    check(d.vocab_size >= 64, "data.vocab_size must be >= 64")
    if d.tokenizer == "clip":  # every rank fails here, at once, rather than rank 0 alone at start-up
        from data_pipelines.clip_tokenizer import merges_path

        try:
            merges_path()
        except ValueError as exc:
            problems.append(str(exc))
    p = cfg.parallel
    check(p.tp >= 1, "parallel.tp must be >= 1")
    check(p.timeout_s > 0, "parallel.timeout_s must be > 0")
    if p.tp > 1:
        problems.extend(_tensor_parallel_problems(cfg))
    if world_size is not None:
        check(world_size % p.tp == 0,
              f"world size {world_size} is not divisible by parallel.tp ({p.tp}); launch a multiple of "
              f"{p.tp} ranks (data-parallel degree = world size / tp)")
    check(cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0")
    check(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last must be >= 0")
    check(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every must be >= 0")
    check(cfg.checkpoint.max_failures >= 1, "checkpoint.max_failures must be >= 1")
    problems += _eval_problems(cfg)
    problems += _cross_site_problems(cfg)
    check(cfg.logging.every >= 1, "logging.every must be >= 1")
    check(bool(cfg.run.dir), "run.dir must be set")
    if schedule:
        problems += schedule_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    if schedule:
        warn_once(schedule_warnings(cfg))


def _nonfinite_problems(section: Any, prefix: str) -> list[str]:
    """Every float key (and float list item) must be finite: YAML reads `.nan` and `.inf`, and `x > 0`
    is false for NaN but true for inf, so range checks alone let them through to the model."""
    out = []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += _nonfinite_problems(value, key + ".")
            continue
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            out.append(f"{key} must be a finite number, got {value}")
    return out


def _eval_problems(cfg: Config) -> list[str]:
    """eval.* and checkpoint.keep_best: ranges, and the keys they need."""
    e, c, out = cfg.eval, cfg.checkpoint, []
    for key in ("every", "max_samples", "batch_size"):
        if getattr(e, key) < 0:
            out.append(f"eval.{key} must be >= 0")
    validating = e.every > 0 or e.at_end
    if validating and not cfg.data.val.strip():
        out.append("eval.every / eval.at_end need data.val (held-out shard URLs)")
    if c.keep_best:
        if not c.keep_best.startswith("val/"):
            out.append(f"checkpoint.keep_best: {c.keep_best!r} is not a validation metric (val/...), e.g. "
                       "val/zeroshot_top1, val/i2t_r1, val/loss")
        if not validating:
            out.append("checkpoint.keep_best needs eval.every > 0 or eval.at_end=true")
        elif e.every and c.every and c.every % e.every:
            out.append(f"checkpoint.keep_best: checkpoint.every ({c.every}) must be a multiple of eval.every "
                       f"({e.every}), so every checkpoint has a validation result")
    return out


def _cross_site_problems(cfg: Config) -> list[str]:
    """cross_site.*: only checked when it is on (`sites` >= 2), so a single job ignores the section. The
    exchange is over each rank's ZeRO-3 partition, so it needs ZeRO-3; noise is drawn per partition, which
    tensor-parallel ranks holding the same replicated parameter would draw differently."""
    x, out = cfg.cross_site, []
    if x.sites < 0:
        out.append(f"cross_site.sites must be >= 0 (0 or 1: off), got {x.sites}")
    if x.sites <= 1:
        if x.site.strip() or x.rendezvous.strip():  # `pretrain launch --site/--rendezvous`, a 1-site config
            out.append(f"cross_site.site / cross_site.rendezvous are set ({x.site!r}, {x.rendezvous!r}) but "
                       f"cross_site.sites is {x.sites} (0 or 1: off): this job would train alone and never "
                       "meet the other sites; set cross_site.sites to the number of sites (the same on every "
                       "site)")
        return out
    if not x.site.strip():
        out.append("cross_site.site must name this site (e.g. cross_site.site=eu, or `pretrain launch --site "
                   "eu`) when cross_site.sites >= 2")
    host, _, port = x.rendezvous.rpartition(":")
    if not host or not is_tcp_port(port):
        out.append(f"cross_site.rendezvous must be HOST:PORT (e.g. 10.0.0.5:29400), got {x.rendezvous!r}")
    if x.every < 1:
        out.append(f"cross_site.every must be >= 1, got {x.every}")
    if not x.outer_lr > 0:
        out.append(f"cross_site.outer_lr must be > 0, got {x.outer_lr}")
    if not 0 <= x.outer_momentum < 1:
        out.append(f"cross_site.outer_momentum must be in [0, 1), got {x.outer_momentum}")
    if x.dp_clip < 0:
        out.append(f"cross_site.dp_clip must be >= 0 (0: no clipping), got {x.dp_clip}")
    if x.dp_noise < 0:
        out.append(f"cross_site.dp_noise must be >= 0 (0: no noise), got {x.dp_noise}")
    if x.dp_noise > 0 and x.dp_clip <= 0:
        out.append("cross_site.dp_noise > 0 needs cross_site.dp_clip > 0 (the noise is scaled to the clip "
                   "norm)")
    if not 0 < x.dp_delta < 1:
        out.append(f"cross_site.dp_delta must be in (0, 1), got {x.dp_delta}")
    if x.timeout_s < 1:
        out.append(f"cross_site.timeout_s must be >= 1, got {x.timeout_s}")
    elif x.timeout_s >= cfg.parallel.timeout_s:
        out.append(f"cross_site.timeout_s ({x.timeout_s}) must be < parallel.timeout_s "
                   f"({cfg.parallel.timeout_s}): the site's other ranks wait for rank 0's exchange in a "
                   "collective bounded by parallel.timeout_s")
    if cfg.parallel.zero_stage != 3:
        out.append(f"cross_site needs parallel.zero_stage=3 (each rank exchanges the ZeRO-3 partition it "
                   f"owns), got {cfg.parallel.zero_stage}")
    if (x.dp_clip > 0 or x.dp_noise > 0) and cfg.parallel.tp > 1:
        out.append("cross_site.dp_clip/dp_noise with parallel.tp > 1 is not supported yet (tensor-parallel "
                   "ranks would clip and noise their replicated parameters differently)")
    return out


def _tensor_parallel_problems(cfg: Config) -> list[str]:
    """Every width that tensor parallelism splits must divide by `parallel.tp`: attention heads (each
    rank computes whole heads), MLP hidden widths (fc1 columns / fc2 rows) and the padded vocabulary
    (embedding rows, MLM logits). The padded vocabulary is a multiple of `model.vocab_pad_multiple`
    whatever the tokenizer's size, so requiring tp | vocab_pad_multiple covers every tokenizer."""
    m, tp, out = cfg.model, cfg.parallel.tp, []
    fusion = SimpleNamespace(width=m.fusion.width or m.text.width, heads=m.fusion.heads)
    for name, tower in (("vision", m.vision), ("text", m.text), ("decoder", m.decoder), ("fusion", fusion)):
        if name == "decoder" and cfg.objectives.mim.weight <= 0:
            continue  # no decoder is built
        if name == "fusion" and m.fusion.layers == 0:
            continue  # no fusion encoder is built
        if tower.heads % tp:
            out.append(f"model.{name}.heads ({tower.heads}) must be divisible by parallel.tp ({tp}): "
                       f"each tensor-parallel rank computes whole heads")
        hidden = int(tower.width * m.mlp_ratio) if math.isfinite(m.mlp_ratio) else 0  # NaN: reported above
        if hidden % tp:
            out.append(f"model.{name}: MLP width {hidden} (width {tower.width} x model.mlp_ratio "
                       f"{m.mlp_ratio}) must be divisible by parallel.tp ({tp})")
    if m.vocab_pad_multiple % tp:
        out.append(f"model.vocab_pad_multiple ({m.vocab_pad_multiple}) must be divisible by parallel.tp "
                   f"({tp}) so the padded vocabulary splits evenly over tensor-parallel ranks")
    return out


def check_runtime(cfg: Config) -> None:
    """Raise one ConfigError naming every switch that asks for a kernel this machine cannot run (CUDA,
    apex, a C++ compiler). `validate` stays machine-independent (a GPU run's config still loads on a
    laptop for eval or planning); the engine builder calls this on the machine that trains.
    `optim.impl=auto` never fails here."""
    from parallel.kernels import fused_layer_norm_problem
    from parallel.optimizers import optimizer_problem

    problems = []
    problem = optimizer_problem(cfg.optim.impl)
    if problem:
        problems.append(problem)
    if cfg.model.fused_layernorm:
        problem = fused_layer_norm_problem()
        if problem:
            problems.append(f"model.fused_layernorm=true: {problem}; set model.fused_layernorm=false")
    import torch

    if cfg.train.fp8:
        from parallel.kernels import fp8_problem

        problem = fp8_problem()
        if problem:
            problems.append(f"train.fp8=true: {problem}; set train.fp8=false")
    if cfg.parallel.zero_quantized_weights and not torch.cuda.is_available():
        # measured on DeepSpeed 0.19 / CPU: the int8 quantizer op raises "This op had not been implemented
        # on CPU backend." at the first all-gather
        problems.append("parallel.zero_quantized_weights=true needs CUDA: DeepSpeed's weight quantizer has "
                        "no CPU kernel (\"This op had not been implemented on CPU backend\"); set it false")
    if problems:
        raise ConfigError("config cannot run on this machine:\n  - " + "\n  - ".join(problems))


def get_key(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
