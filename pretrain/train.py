"""The training loop: shards -> batches -> DeepSpeed engine -> metrics and checkpoints.

Runs unchanged as one process, under the deepspeed launcher, torchrun, mpirun or srun: rank discovery
lives in `launch/`, process groups and the engine in `parallel/`, the model and losses in
`pretrain/models` and `pretrain/objectives`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipelines.loader import make_train_loader
from data_pipelines.position import PositionTracker
from data_pipelines.tokenizer import TextTokenizer, train_tokenizer_from_shards
from parallel import groups
from parallel.engine import build_engine
from pretrain import checkpoint as ckpt
from pretrain.config import Config, config_from_dict, dump_yaml, to_dict, validate
from pretrain.metrics import MetricsWriter
from pretrain.models.pretrain_model import PretrainModel

log = logging.getLogger("mmpt.train")
# DeepSpeed's ZeRO-3 calls these torch.distributed spellings once per step; the warning is not ours to fix.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")

LOSS_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm")


def _prepare_tokenizer(cfg: Config, run_dir: Path, resumed: dict[str, Any] | None) -> TextTokenizer:
    """Same tokenizer on every rank: the checkpoint's, the configured file, or one trained on rank 0."""
    path = run_dir / "tokenizer.json"
    if resumed is not None and resumed.get("tokenizer"):
        if groups.rank() == 0:
            path.write_text(resumed["tokenizer"])
    elif cfg.data.tokenizer:
        if groups.rank() == 0:
            tok = TextTokenizer.load(cfg.data.tokenizer)
            tok.save(path)
    elif groups.rank() == 0 and not path.exists():
        log.info("training a %d-token BPE tokenizer on %s", cfg.data.vocab_size, cfg.data.train)
        tok = train_tokenizer_from_shards(cfg.data.train, cfg.data.vocab_size, cfg.data.tokenizer_samples)
        tok.save(path)
    groups.barrier()
    return TextTokenizer.load(path)


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors; floating inputs follow the engine's parameter dtype (bf16/fp16 under DeepSpeed)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over all ranks for logging; one small all_reduce."""
    if not values or not groups.is_distributed() or groups.world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= groups.world_size()
    return dict(zip(keys, t.tolist()))


def _gather_positions(tracker: PositionTracker, batches: int) -> list[dict[str, Any]]:
    """Every rank's data position, so each rank's checkpoint file can describe the whole stream."""
    mine = tracker.state(batches)
    if not groups.is_distributed() or groups.world_size() == 1:
        return [mine]
    allpos: list[Any] = [None] * groups.world_size()
    dist.all_gather_object(allpos, mine)
    return allpos


def _skip_totals(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    """Skipped samples by reason, summed over this rank's workers and then over all ranks.

    Reasons differ between ranks, so this gathers dicts (a few bytes, only at log steps)."""
    mine: dict[str, int] = {}
    for counts in per_worker.values():
        for reason, n in counts.items():
            mine[reason] = mine.get(reason, 0) + int(n)
    if not groups.is_distributed() or groups.world_size() == 1:
        return mine
    every: list[Any] = [None] * groups.world_size()
    dist.all_gather_object(every, mine)
    total: dict[str, int] = {}
    for counts in every:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return total


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Run `cfg.train.steps` optimizer steps (continuing from `resume`); return a summary dict."""
    groups.init_distributed(cfg.parallel.timeout_s, cfg.parallel.tp)
    validate(cfg, world_size=groups.world_size())
    rank, dp_rank, dp_world = groups.rank(), groups.dp_rank(), groups.dp_world_size()
    run_dir = Path(cfg.run.dir)
    root = ckpt.checkpoint_root(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    groups.barrier()

    target = ckpt.resolve(resume, root) if resume else None
    resumed = ckpt.read_client_state(*target) if target else None
    if resumed is not None:
        saved = config_from_dict(resumed["config"])
        if (saved.model, saved.objectives) != (cfg.model, cfg.objectives):
            raise ValueError(f"--resume {resume}: model or objectives config differs from the checkpoint's; "
                             "resume with the same model.* and objectives.* settings")
    tokenizer = _prepare_tokenizer(cfg, run_dir, resumed)
    if rank == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    torch.manual_seed(cfg.train.seed)
    model = PretrainModel(cfg.model, cfg.objectives, vocab_size=tokenizer.vocab_size,
                          pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                          activation_checkpointing=cfg.train.activation_checkpointing)
    engine, _ = build_engine(cfg, model, dp_world)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)

    start_step, position = 0, None
    if target is not None:
        load_path, client = engine.load_checkpoint(str(target[0]), tag=target[1])
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {target[0]}/{target[1]}")
        state = client["mmpt"]
        start_step = int(state["step"])
        position = state["data_positions"][dp_rank]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s/%s at step %d", target[0], target[1], start_step)

    loader = make_train_loader(cfg, tokenizer, rank=dp_rank, world=dp_world, position=position)
    tracker = PositionTracker(cfg.data.workers, dp_world, position)
    batches = int(position["batches"]) if position else 0
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    per_step = cfg.train.micro_batch * cfg.train.grad_accum * dp_world

    def save(step: int) -> None:
        client = {"mmpt": {
            "step": step, "config": to_dict(cfg), "tokenizer": (run_dir / "tokenizer.json").read_text(),
            "data_positions": _gather_positions(tracker, batches), "dp_world": dp_world,
            "tp": cfg.parallel.tp, "rng": torch.get_rng_state(),
        }}
        engine.save_checkpoint(str(root), tag=ckpt.tag_for(step), client_state=client)
        log.info("saved checkpoint %s/%s", root, ckpt.tag_for(step))

    bar = None
    if rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", dynamic_ncols=True)

    it = iter(loader)
    sums: dict[str, float] = {}
    n_micro, wait_s, window_start = 0, 0.0, time.perf_counter()
    run_start, last_logged = time.perf_counter(), {}
    worker_skips: dict[int, dict[str, int]] = {}
    step = start_step
    engine.train()
    while step < cfg.train.steps:
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(it)
            wait_s += time.perf_counter() - t0
            tracker.update(batch)
            worker_skips[batch["_position"]["worker"]] = dict(batch.get("_skips", {}))
            batches += 1
            out = engine(_to_device(batch, engine.device, dtype))
            engine.backward(out["loss"])
            engine.step()
            for k in LOSS_KEYS:
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k].detach().float())
            n_micro += 1
            temperature = 1.0 / float(out["logit_scale"])
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(out['loss']):.3f}")
        if step % cfg.logging.every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = n_micro / cfg.train.grad_accum
            values = _mean_over_ranks({**{k: v / n_micro for k, v in sums.items()},
                              "wait": wait_s / max(elapsed, 1e-9)}, engine.device)
            skips = _skip_totals(worker_skips)
            grad_norm = engine.get_global_grad_norm()
            row = {
                **{k: round(values[k], 6) for k in LOSS_KEYS if k in values},
                "lr": engine.get_lr()[0],
                "temperature": round(temperature, 6),
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "samples_per_s": round(steps_in_window * per_step / max(elapsed, 1e-9), 3),
                "data_wait_frac": round(values["wait"], 4),
                "skipped": int(sum(skips.values())),
            }
            metrics.log(step, row)
            last_logged = row
            sums, n_micro, wait_s, window_start = {}, 0, 0.0, time.perf_counter()
        if step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            save(step)
    if bar is not None:
        bar.close()
    metrics.close()
    wall = time.perf_counter() - run_start
    summary = {
        "steps": step, "start_step": start_step, "run_dir": str(run_dir),
        "wall_s": round(wall, 2),
        "samples_per_s": round((step - start_step) * per_step / max(wall, 1e-9), 3),
        "final": last_logged, "checkpoint": str(root),
        "skipped": _skip_totals(worker_skips),
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
