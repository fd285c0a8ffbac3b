"""The training loop: shards -> batches -> DeepSpeed engine -> metrics and checkpoints.

Runs unchanged as one process, under the deepspeed launcher, torchrun, mpirun or srun: rank discovery
lives in `launch/`, process groups and the engine in `parallel/`, the model and losses in
`pretrain/models` and `pretrain/objectives`, prepared for training by `pretrain/parallelize.py`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipelines.audit import KeyAudit
from data_pipelines.clip_tokenizer import ClipTokenizer
from data_pipelines.loader import make_train_loader
from data_pipelines.monitor import local_totals, merge_totals, metrics_row
from data_pipelines.position import PositionTracker
from data_pipelines.stats import check_bad_fraction
from data_pipelines.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer_from_shards
from launch.logs import install_filters
from launch.mpi import launch_rank_info
from launch.signals import StoppedBeforeTraining, StoppedForRequeue, StopRequest, take_early
from parallel import groups
from parallel.comms_probe import CommsProbe
from parallel.consensus import any_rank, sum_over_ranks
from parallel.engine import build_engine, clamp_parameter_
from pretrain import faults
from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import best as best_ckpt
from pretrain.checkpoint.cross_site import start_outer_loop
from pretrain.checkpoint.resume import resolve_start, save_universal
from pretrain.checkpoint.run_dir import check_start, nothing_to_train
from pretrain.checkpoint.tags import tag_for
from pretrain.config import (
    Config,
    ConfigError,
    dump_yaml,
    engine_spec,
    stream_spec,
    to_dict,
    validate,
)
from pretrain.metrics import MetricsWriter, ProgressBar
from pretrain.nonfinite import LOSS_KEYS, NonFiniteGuard, Window, defers_to_optimizer
from pretrain.parallelize import parallelize
from pretrain.plan.memory import log_startup_plan, record_measured
from pretrain.tasks import build_model, client_state, make_validator

log = logging.getLogger("mmpt.train")
install_filters()  # also when train() is called in-process, not through pretrain.cli (launch/logs.py)


def _prepare_tokenizer(cfg: Config, run_dir: Path, resumed: dict[str, Any] | None
                       ) -> TextTokenizer | ClipTokenizer:
    """Same tokenizer on every rank: the checkpoint's, the configured one (a file, or `clip`: OpenAI CLIP's
    BPE), or one trained on rank 0."""
    path = run_dir / "tokenizer.json"
    if resumed is not None and resumed.get("tokenizer"):
        if groups.rank() == 0:
            path.write_text(resumed["tokenizer"])
    elif cfg.data.tokenizer:
        if groups.rank() == 0:
            tok = load_tokenizer(cfg.data.tokenizer)
            tok.save(path)
    elif groups.rank() == 0 and not path.exists():
        log.info("training a %d-token BPE tokenizer on %s", cfg.data.vocab_size, cfg.data.train)
        tok = train_tokenizer_from_shards(cfg.data.train, cfg.data.vocab_size, cfg.data.tokenizer_samples,
                                          cfg.data.max_sample_bytes)
        tok.save(path)
    groups.barrier()
    return load_tokenizer(path)


KEEP_FP32 = ("patch_noise", "itm_noise")
"""Floating batch entries that are random draws, not activations: they stay fp32 under bf16/fp16. MAE keeps
the patches with the smallest noise; in bf16 (8 mantissa bits) about 9% of samples at 64 patches and 23% at
196 have ties at the keep threshold, so the mask would depend on the precision, not only on the seed."""


def move_batch(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors; floating inputs follow the engine's parameter dtype (bf16/fp16 under DeepSpeed),
    except the random draws in `KEEP_FP32`."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and k not in KEEP_FP32:
                v = v.to(dtype)
        out[k] = v
    return out


def _report_skew(flags: torch.Tensor, phrase: str, rank: int) -> None:
    """`objectives.itm.skew_*`: how many of the first batch's captions hold the phrase, so a phrase the data
    never uses (a typo: every pair then weighs the same and nothing is skewed) shows in the log."""
    hits = int(flags.sum())
    if hits == 0:
        log.warning("rank %d: objectives.itm.skew_phrase %r is in none of the %d captions of the first "
                    "batch: if the data never says it, nothing is skewed", rank, phrase, len(flags))
    elif rank == 0:
        log.info("objectives.itm.skew_phrase %r: in %d of the first batch's %d captions", phrase, hits,
                 len(flags))


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over all ranks for logging; one small all_reduce."""
    keys = sorted(values)
    n = groups.world_size()
    return {k: v / n for k, v in zip(keys, sum_over_ranks([values[k] for k in keys], device))}


def _gather_positions(tracker: PositionTracker) -> list[dict[str, Any]]:
    """Every rank's data position, so each rank's checkpoint file can describe the whole stream (and a
    resume under another layout can re-deal the unconsumed samples)."""
    mine = tracker.state()
    if not groups.is_distributed() or groups.world_size() == 1:
        return [mine]
    allpos: list[Any] = [None] * groups.world_size()
    dist.all_gather_object(allpos, mine)
    return allpos


def _data_totals(tracker: PositionTracker) -> dict[str, Any]:
    """Skips by reason, samples delivered and shards opened, summed over all data-parallel ranks.

    Gathers small dicts, only at log steps; every rank gets the same totals, so the bad-fraction check
    stops all ranks at the same step."""
    mine = local_totals(tracker)
    if not groups.is_distributed() or groups.dp_world_size() == 1:
        return merge_totals([mine])
    every: list[Any] = [None] * groups.dp_world_size()
    dist.all_gather_object(every, mine, group=groups.get_data_parallel_group())
    return merge_totals(every)


def _stop_before_training(stop: StopRequest) -> None:
    """Before the first optimizer step, all ranks agree whether a stop was requested (one all-reduce; the
    handler is in place from the rank's start, launch.signals.install_early) and, if so, exit 75 now."""
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    if any_rank(stop.requested, device):
        exc = StoppedBeforeTraining(stop.signal_name)
        log.warning("%s; exiting %d (requeue)", exc, exc.code)
        stop.ignore_further()  # as for a stop in the loop: a late TERM must not turn 75 into 143
        raise exc


def train(cfg: Config, resume: str | None = None, init_from: str | None = None,
          overwrite_run: bool = False) -> dict[str, Any]:
    """Run `cfg.train.steps` optimizer steps (continuing from `resume`, or starting from the weights of
    `init_from`); return a summary dict. A start from step 0 into a run.dir that holds another run is
    refused unless `overwrite_run` (which deletes that run's outputs first: checkpoint/run_dir.py)."""
    # preemption (launch/signals.py): SIGUSR1/SIGTERM -> checkpoint + exit 75 (`pretrain train` installs it)
    stop = take_early() or StopRequest().install()
    validate(cfg, world_size=launch_rank_info().world_size)  # every config problem, before any process group
    if not cfg.data.train.strip():
        raise ConfigError("data.train is empty: give the training shards, e.g. "
                          "data.train='shards/shard-{000000..000023}.tar' (see `pretrain data synth|import`)")
    check_start(cfg, resume, init_from, overwrite_run, launch_rank_info().rank)  # another run in run.dir
    groups.init_distributed(cfg.parallel.timeout_s, cfg.parallel.tp)
    _stop_before_training(stop)  # a stop in the rank's first seconds: exit 75 now, nothing to save yet
    rank, dp_rank, dp_world = groups.rank(), groups.dp_rank(), groups.dp_world_size()
    run_dir = Path(cfg.run.dir)
    root = ckpt.checkpoint_root(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    groups.barrier()

    start = resolve_start(cfg, root, resume, init_from)  # checks the config fits; loads nothing yet
    done_before = nothing_to_train(cfg, start.client, start.describe(), root, rank)  # at/past train.steps
    if done_before is not None:
        stop.restore()
        return done_before
    tokenizer = _prepare_tokenizer(cfg, run_dir, start.tokenizer_state)
    if rank == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    torch.manual_seed(cfg.train.seed)
    # `train.task` (pretrain/tasks/): PretrainModel, or the fine-tuning classifier built from `start`'s init
    model = parallelize(build_model(cfg, tokenizer, start, run_dir), cfg)  # this rank's share under TP
    memory_plan = log_startup_plan(cfg, model, groups.world_size(), rank)  # per-rank bytes (pretrain/plan/)
    engine, _ = build_engine(engine_spec(cfg), model, dp_world)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)

    start_step, position = start.load(engine)
    outer = start_outer_loop(cfg, engine, start, run_dir)  # cross_site.*: None for an ordinary single job

    loader = make_train_loader(cfg.data, stream_spec(cfg), tokenizer, dp_rank, dp_world, position,
                               captions=cfg.train.task != "classify", labels=cfg.train.task == "classify")
    tracker = loader.tracker  # every worker's start state; updated with each consumed batch
    # a resume (also `--resume latest` finding no checkpoint: step 0) drops what was logged after its step
    resume_step = start_step if resume is not None else None
    audit = KeyAudit(run_dir, dp_rank, dp_world, enabled=cfg.data.log_keys and groups.tp_rank() == 0,
                     resume_step=resume_step)
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                            resume_step=resume_step,
                            val_pending=bool(start.client and start.client.get("val_pending")))
    per_step = cfg.train.micro_batch * cfg.train.grad_accum * dp_world

    save_failures = 0

    def save(step: int, final: bool = False, val: dict[str, Any] | None = None, val_pending: bool = False
             ) -> None:
        """Atomic save; a failure is reported and training goes on from memory, up to a limit. `val`: this
        step's validation, for `checkpoint.keep_best`; `val_pending`: a stop skipped this step's due
        validation, which the resume then runs first (`best.validate_pending`)."""
        nonlocal save_failures
        published, metric = None, cfg.checkpoint.keep_best
        if metric and val and best_ckpt.improves(root, metric, val.get(metric)):
            def published(tag: str) -> None:
                best_ckpt.record_best(root, metric, val[metric], step, tag)
        client = {"mmpt": {
            "step": step, "config": to_dict(cfg), "tokenizer": (run_dir / "tokenizer.json").read_text(),
            "data_positions": _gather_positions(tracker), "dp_world": dp_world,
            "tp": cfg.parallel.tp, "rng": torch.get_rng_state(), **client_state(cfg),
            **({"cross_site": outer.state_dict()} if outer is not None else {}),  # this rank's partition's
            **({"val_pending": True} if val_pending else {}),
        }}
        audit.flush()
        try:  # a failure on any rank raises on every rank, at the same point (pretrain/checkpoint/atomic.py)
            tag = ckpt.save_atomic(engine, root, step, client, keep_last=cfg.checkpoint.keep_last,
                                   keep_every=cfg.checkpoint.keep_every, published=published)
            log.info("saved checkpoint %s/%s", root, tag)
            if cfg.checkpoint.universal:
                save_universal(root, tag)  # pretrain/checkpoint/resume.py
        except ckpt.CheckpointSaveError as e:
            save_failures += 1
            log.error("rank %d: %s (failure %d of at most %d in a row)", rank, e, save_failures,
                      cfg.checkpoint.max_failures)
            metrics.log(step, {"checkpoint_failed": str(e)})
            if final or save_failures >= cfg.checkpoint.max_failures:
                raise
            return
        save_failures = 0

    bar = ProgressBar(cfg.train.steps, start_step) if rank == 0 and cfg.logging.progress else None
    validator = make_validator(cfg, tokenizer, engine.module, lambda b: move_batch(b, engine.device, dtype),
                               dtype)
    best_ckpt.validate_pending(cfg.checkpoint.keep_best, start, start_step, tag_for(start_step), validator,
                               metrics, root)

    it = iter(loader)
    window = Window()  # this log window's losses, on the device until the next log step
    n_micro, wait_s, window_start = 0, 0.0, time.perf_counter()
    run_start, last_logged = time.perf_counter(), {}
    step = start_step
    engine.train()
    deferred = defers_to_optimizer(cfg.parallel.zero_stage)  # pretrain/nonfinite.py: no read per micro-batch
    guard = NonFiniteGuard(cfg.train.nonfinite_patience, engine, lambda: ckpt.latest_tag(root), deferred)
    tail_from = cfg.train.steps - cfg.objectives.mim.unmasked_tail_steps  # by step number: resumable
    logit_scale: torch.Tensor | None = None
    comms = CommsProbe()  # DeepSpeed's comms logger per step, only under MMPT_COMMS_LOG (plan --comm tests)
    while step < cfg.train.steps:
        engine.module.set_unmasked_tail(step >= tail_from)  # FLIP's unmasking tuning for the last steps
        engine.module.set_itm_hardness(step)  # objectives.itm.hard_warmup_steps: easy -> hard negatives
        lr = engine.get_lr()[0]  # the rate this step uses: the scheduler moves at its optimizer step
        done, pending = 0, []
        while done < cfg.train.grad_accum:
            t0 = time.perf_counter()
            batch = next(it)
            wait_s += time.perf_counter() - t0
            tracker.update(batch)
            if step == start_step and done == 0 and "itm_skew" in batch:
                _report_skew(batch["itm_skew"], cfg.objectives.itm.skew_phrase, rank)
            out = faults.poison(engine(move_batch(batch, engine.device, dtype)))
            if deferred:  # on-device flag; a non-finite loss makes the optimizer skip this step
                loss = guard.backward_loss(out, window.add(out, step + 1))
            else:  # ZeRO 0: read now, and drop the micro-batch on every rank before backward
                if not guard.forward_ok(out, step + 1):
                    continue  # every rank drops this micro-batch: no backward, no step, not in the audit
                window.add(out, step + 1)
                loss = out["loss"]
            pending.append(batch)
            engine.backward(loss)
            engine.step()
            done += 1
            n_micro += 1
            if "logit_scale" in out:
                logit_scale = out["logit_scale"]  # a fresh tensor (exp of the parameter): read at log steps
        skipped = guard.step_done(step + 1) if deferred else guard.after_step(step + 1)
        if not skipped:  # the key audit lists what was trained, not a step the optimizer skipped
            for b in pending:
                audit.record(b, step + 1)
        step += 1
        comms.after_step(step)
        if outer is not None:  # every cross_site.every steps: exchange with the other sites, outer step
            outer.after_step(step)
        if logit_scale is not None:  # CLIP's ceiling (a fine-tuned classifier has no logit scale)
            clamp_parameter_(engine.module.logit_scale, engine.module.logit_scale_ceiling)
        if step == start_step + 1:  # measured per-rank bytes next to the plan -> RUN_DIR/memory.json
            record_measured(engine, memory_plan, run_dir)
        log_step = step % cfg.logging.every == 0 or step == cfg.train.steps
        every = cfg.train.stop_check_every
        # preemption: all ranks stop at the same step; checked only at log steps (or every N), never
        # in between, so a healthy step holds no collective and no read for it
        stopping = (log_step if every == 0 else step % every == 0) and any_rank(stop.requested,
                                                                                engine.device)
        if log_step or stopping:
            micro, ok = window.read(engine.device)
            if deferred:  # count, warn, and stop on patience, for the whole window (same on every rank)
                guard.review([(m.step, v, f) for m, v, f in zip(window.micro, micro, ok)])
            window.clear()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}  # per loss: the unmasked tail drops loss_mim mid-window
            for v, f in zip(micro, ok):
                if f:
                    for k, x in v.items():
                        sums[k], counts[k] = sums.get(k, 0.0) + x, counts.get(k, 0) + 1
            elapsed = time.perf_counter() - window_start
            steps_in_window = n_micro / cfg.train.grad_accum
            values = _mean_over_ranks({**{k: v / counts[k] for k, v in sums.items()},
                                       "wait": wait_s / max(elapsed, 1e-9)}, engine.device)
            data_totals = _data_totals(tracker)
            grad_norm = engine.get_global_grad_norm()
            temperature = None if logit_scale is None else 1.0 / float(logit_scale)
            row = {
                **{k: round(values[k], 6) for k in LOSS_KEYS if k in values},
                "lr": lr,
                "temperature": None if temperature is None else round(temperature, 6),
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "samples_per_s": round(steps_in_window * per_step / max(elapsed, 1e-9), 3),
                "data_wait_frac": round(values["wait"], 4),
                **metrics_row(data_totals),  # skipped samples, skip_<reason>, bad fractions
                "nonfinite_skipped": guard.total,
                "contrastive_mask_ratio": engine.module.contrastive_mask_ratio(),
                **(outer.last if outer is not None else {}),  # cross-site round, sites, bytes, epsilon
            }
            metrics.log(step, row)
            last_logged = row
            if bar is not None:
                bar.step(row.get("loss"))
            d = cfg.data
            check_bad_fraction(data_totals["skips"], data_totals["delivered"], data_totals["shards"],
                               d.max_bad_fraction, d.bad_check_after)
            n_micro, wait_s, window_start = 0, 0.0, time.perf_counter()
        elif bar is not None:
            bar.step()  # no loss between log steps: reading it would wait for the device
        # eval.every / at_end; a stop skips it (stop fast) and the resume runs it first (val_pending), but a
        # stop at the last step ends the run (no resume): validate it now
        skip_val = stopping and step < cfg.train.steps
        val = validator.run(step) if validator.due(step) and not skip_val else None
        if val is not None:
            metrics.log(step, val)
        faults.maybe_kill("after-step", step)
        faults.maybe_signal(step)
        faults.maybe_hold(step)
        if step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping:
            save(step, final=step == cfg.train.steps or stopping, val=val,
                 val_pending=skip_val and validator.due(step))
        if stopping:  # preemption: this step is logged and saved; the requeued job resumes after it
            break
    comms.dump(rank)
    if bar is not None:
        bar.close()
    metrics.close()
    audit.close()
    if step < cfg.train.steps:  # preemption: stopped early on request
        groups.barrier()  # every rank's checkpoint shard is written before any rank exits
        log.warning("stopped at step %d on %s; checkpoint saved", step, stop.signal_name)
        stop.ignore_further()  # a late TERM (srun --kill-on-bad-exit) must not turn exit 75 into 143
        raise StoppedForRequeue(step, stop.signal_name)
    stop.restore()
    if outer is not None:
        outer.finish()  # the other sites stop waiting for this one
    wall = time.perf_counter() - run_start
    summary = {
        "steps": step, "start_step": start_step, "run_dir": str(run_dir),
        "wall_s": round(wall, 2), "validation_s": round(validator.seconds, 2),
        "samples_per_s": round((step - start_step) * per_step / max(wall, 1e-9), 3),
        "final": last_logged, "checkpoint": str(root),
        "skipped": (data_totals := _data_totals(tracker))["skips"],
        "data": {**metrics_row(data_totals), "samples_delivered": data_totals["delivered"],
                 "shards_opened": data_totals["shards"]},
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
