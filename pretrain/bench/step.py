"""`pretrain bench step`: samples/s, time split, peak memory, analytic FLOPs and MFU of training steps.

The loop is the training loop's step stripped of metrics and checkpoints, on the same pieces: the
`PretrainModel` and `build_engine` (DeepSpeed, ZeRO, precision) that `pretrain train` builds, and its
data loader when `data.train` is set (else synthetic batches of the right shapes, made in this
process, so "data" then measures only batch creation). Each phase is timed with a device
synchronisation on both sides, which serialises what CUDA would overlap: the split is an attribution,
and samples/s is measured over the whole timed steps. One process: there are no collectives, so
communication is 0 by construction; under several ranks ZeRO's gathers and reduce-scatters run inside
forward/backward and would need a profiler to separate.

MFU = analytic model FLOPs per sample (`pretrain/plan/flops.py`, 3 x forward) x samples/s / peak, with the
peak from a table of bf16 dense rates by CUDA device name, or on CPU a measured fp32 matmul rate.

`--vs open_clip` then trains open_clip_torch's CLIP with the same shapes, batches, precision and steps in
this process (`pretrain/bench/vs_open_clip.py`) and adds `vs_open_clip` (its samples/s and ratio =
ours / open_clip);
`--vs-patch-dropout P` adds a second open_clip line with its own FLIP patch dropout. The comparison uses
synthetic batches on both sides (the same generator and seed). open_clip trains the contrastive loss
alone: where our configured step does other work (MAE, MLM, ITM, another share of patches), ours is timed
again with open_clip's work and that like-for-like ratio is printed first, the configured one labelled.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from data_pipelines.tokenizer import EOS_ID, MASK_ID, SOS_ID
from parallel.memory import peak_rss_mb
from pretrain.bench.timing import sync, timed_steps
from pretrain.config import Config, engine_spec, load_config, stream_spec
from pretrain.plan.flops import flops_per_sample

log = logging.getLogger("mmpt.bench")

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peak FLOP/s (no sparsity), matched against torch.cuda.get_device_name."""


def measured_cpu_peak(n: int = 1024, reps: int = 8, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> float:
    """Matmul FLOP/s of this CPU (fp32, torch's current threads) or of `device` in `dtype`: best of
    `reps` after a warm-up."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS.items():
            if key in name:
                return peak, f"table: {key} bf16 dense ({name})"
        # a GPU not in the table: measure rather than fail after the whole benchmark ran
        peak = measured_cpu_peak(4096, 8, device, torch.bfloat16)
        return peak, f"measured bf16 matmul on {name} (not in the peak table {', '.join(PEAK_FLOPS)})"
    return measured_cpu_peak(), f"measured fp32 matmul on CPU ({torch.get_num_threads()} threads)"


def synthetic_batches(cfg: Config, vocab_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Random batches with the shapes and key set the training stream delivers."""
    m, b = cfg.model, cfg.train.micro_batch
    n = (m.image_size // m.vision.patch_size) ** 2
    L = m.text.context_length
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(MASK_ID + 1, vocab_size, (b, L), generator=gen)  # no special ids inside
        ids[:, 0], ids[:, -1] = SOS_ID, EOS_ID
        labels = torch.where(torch.rand(b, L, generator=gen) < cfg.objectives.mlm.mask_prob, ids, -100)
        yield {"image": torch.randn(b, 3, m.image_size, m.image_size, generator=gen), "text": ids,
               "mlm_input": torch.where(labels != -100, MASK_ID, ids), "mlm_labels": labels,
               "patch_noise": torch.rand(b, n, generator=gen)}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "how": "torch.cuda.max_memory_allocated (measured)"}
    return {"peak_bytes": int(peak_rss_mb() * 2**20),
            "how": "peak RSS (VmHWM) of this process incl. Python, torch and DeepSpeed (measured)"}


def run_bench(cfg: Config, steps: int = 10, warmup: int = 2, synthetic: bool = False,
              vs: str | None = None, vs_patch_dropout: float = 0.0) -> dict[str, Any]:
    """Build model + engine as training does, run `warmup` untimed and `steps` timed optimizer steps.

    `vs="open_clip"`: afterwards train open_clip's CLIP on the same synthetic batches (see
    `pretrain/bench/vs_open_clip.py`) and add `vs_open_clip`; `vs_patch_dropout` > 0 adds a second
    open_clip run with that patch dropout under `vs_open_clip["patch_dropout_run"]`."""
    from parallel import groups
    from parallel.engine import build_engine, clamp_parameter_
    from pretrain.models.pretrain_model import PretrainModel
    from pretrain.parallelize import parallelize
    from pretrain.train import move_batch

    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if cfg.train.task != "pretrain":  # it builds PretrainModel and counts its FLOPs: numbers of another model
        raise ValueError(f"train.task={cfg.train.task!r}: `pretrain bench step` times the pretraining model "
                         "(CLIP + MAE + MLM) only; time a fine-tune from its own metrics.jsonl "
                         "(samples_per_s); plan its memory with "
                         "`pretrain plan --world N train.task=classify`")
    if vs not in (None, "open_clip"):
        raise ValueError(f"--vs {vs!r}: only open_clip is supported")
    if not 0.0 <= vs_patch_dropout < 1.0:
        raise ValueError("--vs-patch-dropout must be in [0, 1)")
    if vs:
        from pretrain.bench.vs_open_clip import import_open_clip

        import_open_clip()  # fail before building anything
        synthetic = True  # both sides see the same synthetic batches
    groups.init_distributed(cfg.parallel.timeout_s, cfg.parallel.tp)
    if groups.world_size() != 1:
        raise ValueError("bench step runs single-process; launch it without a launcher")
    use_data = bool(cfg.data.train) and not synthetic
    if use_data:
        from data_pipelines.loader import make_train_loader
        from data_pipelines.tokenizer import load_tokenizer, train_tokenizer_from_shards

        tok = (load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else
               train_tokenizer_from_shards(cfg.data.train, cfg.data.vocab_size, cfg.data.tokenizer_samples,
                                           cfg.data.max_sample_bytes))
        vocab = tok.vocab_size
        batches: Iterator[dict[str, Any]] = iter(make_train_loader(cfg.data, stream_spec(cfg), tok, rank=0,
                                                                    world=1))
    else:
        vocab = cfg.data.vocab_size
        batches = synthetic_batches(cfg, vocab, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = (PretrainModel.from_config(cfg, tok) if use_data else
             PretrainModel.from_config(cfg, vocab_size=vocab))
    padded_vocab, n_params = model.vocab_size, sum(p.numel() for p in model.parameters())  # before ZeRO-3
    n_shared = 0
    if vs:
        from pretrain.bench.vs_open_clip import shared_parameter_count

        n_shared = shared_parameter_count(model)  # also before ZeRO-3 empties the parameters
    engine, _ = build_engine(engine_spec(cfg), parallelize(model, cfg), 1)
    device = engine.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    engine.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def optimizer_step(i: int) -> None:
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch of the step
        if i == cfg.train.grad_accum - 1:  # then the logit-scale ceiling, as training (and open_clip) do
            clamp_parameter_(engine.module.logit_scale, engine.module.logit_scale_ceiling)

    timed = timed_steps(device, steps, warmup, cfg.train.grad_accum,
                        data=lambda: move_batch(next(batches), device, dtype), forward=engine,
                        backward=lambda out: engine.backward(out["loss"]),
                        optimizer=optimizer_step)
    micro, wall, cpu, phases = timed["micro"], timed["wall_s"], timed["cpu_s"], timed["phases"]
    samples = micro * cfg.train.micro_batch
    sps = samples / wall
    flops = flops_per_sample(cfg, padded_vocab, global_batch=cfg.train.micro_batch)
    peak, peak_source = device_peak(device)
    achieved = flops["train"] * sps
    res = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": cfg.train.precision, "zero_stage": cfg.parallel.zero_stage,
        "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
        "steps": steps, "warmup_steps": warmup, "samples": samples, "wall_s": round(wall, 6),
        "samples_per_s": round(sps, 3),
        "process_cpu_s": round(cpu, 4),  # CPU time of all this process's threads over the timed steps
        "data_source": "training loader (data.train)" if use_data else "synthetic batches in-process",
        "time_s": {**{k: round(v, 6) for k, v in phases.items()}, "communication": 0.0},
        "time_frac": {k: round(v / wall, 4) for k, v in phases.items()},
        "communication_note": "single process: no collectives (0 by construction)",
        "memory": _peak_memory(device),
        "flops_per_sample": flops["train"], "flops_forward_per_sample": flops["forward"],
        "flops_parts": flops["parts"],
        "achieved_flops_per_s": round(achieved, 1), "peak_flops_per_s": round(peak, 1),
        "peak_source": peak_source, "mfu": round(achieved / peak, 5),
        "parameters": n_params,
    }
    if vs:
        # free our engine first: open_clip's peak memory and speed must not include ours
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res["vs_open_clip"] = _vs_open_clip(cfg, n_shared, res, padded_vocab, vocab, device, steps, warmup,
                                            peak, vs_patch_dropout,
                                            lambda c: run_bench(c, steps, warmup, synthetic=True))
    return res


def _vs_open_clip(cfg: Config, n_shared: int, ours: dict[str, Any], padded_vocab: int, vocab: int,
                  device: torch.device, steps: int, warmup: int, peak: float, patch_dropout: float,
                  run_ours: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """open_clip side(s) of `--vs open_clip`, on the batches our run saw (fresh generator, same seed).

    `ratio` is always the configured run's. Where that run does other work than the open_clip line
    (MAE, MLM, ITM, another share of patches: `like_for_like_changes`), `run_ours` times our step again
    with open_clip's work and the row adds `like_for_like_ratio` (printed first) and says why `ratio` is
    not like-for-like."""
    from pretrain.bench.vs_open_clip import (
        compare,
        like_for_like_changes,
        open_clip_flops,
        run_open_clip,
        unlike_reason,
        with_changes,
    )

    runs = [0.0] + ([patch_dropout] if patch_dropout > 0 else [])
    rows = []
    for p in runs:
        changes = like_for_like_changes(cfg, p)
        fair = run_ours(with_changes(cfg, changes)) if changes else None
        theirs = run_open_clip(cfg, padded_vocab, synthetic_batches(cfg, vocab, cfg.train.seed), device,
                               steps, warmup, patch_dropout=p)
        row = compare(ours, theirs, peak, open_clip_flops(cfg, padded_vocab, p))
        row["like_for_like"] = fair is None
        if fair is not None:
            same = compare(fair, theirs)
            row.update(not_like_for_like=unlike_reason(cfg, p), like_for_like_ratio=same["ratio"])
            if "ratio_per_cpu_s" in same:
                row["like_for_like_ratio_per_cpu_s"] = same["ratio_per_cpu_s"]
            row["ours_like_for_like"] = {"overrides": [f"{k}={v}" for k, v in changes.items()],
                                         **{k: fair[k] for k in ("samples_per_s", "samples", "wall_s",
                                                                 "process_cpu_s", "time_s", "parameters")}}
        rows.append(row)
    main = rows[0]
    main["ours_shared_parameters"] = n_shared  # our parameters open_clip's CLIP also has
    if len(rows) > 1:
        main["patch_dropout_run"] = rows[1]
    return main


def _print_vs(row: dict[str, Any]) -> None:
    """One open_clip line: the like-for-like ratio first; the configured run's, when it differs, labelled."""
    fair = row.get("like_for_like_ratio")
    per_cpu = "like_for_like_ratio_per_cpu_s" if fair is not None else "ratio_per_cpu_s"
    head = (f"{row['library']} (patch_dropout {row['patch_dropout']}, {row['precision_mode']}, "
            f"{row['loss']}, same batches): {row['samples_per_s']} samples/s; ")
    if fair is None:
        head += f"ours / open_clip = {row['ratio']:.3f}x (like-for-like)"
    else:
        o = row["ours_like_for_like"]
        head += (f"like-for-like ours / open_clip = {fair:.3f}x (ours with {' '.join(o['overrides'])}: "
                 f"{o['samples_per_s']} samples/s)")
    print(head + (f" ({row[per_cpu]:.3f}x per CPU-second)" if per_cpu in row else ""))
    if fair is not None:
        print(f"  configured run / open_clip = {row['ratio']:.3f}x, NOT like-for-like: "
              f"{row['not_like_for_like']}")
    print("  time: " + ", ".join(f"{k} {v:.3f}s" for k, v in row["time_s"].items()) + f" of {row['wall_s']}s"
          + (f"; MFU {row['mfu']:.2%}" if "mfu" in row else ""))


def cmd_bench_step(args: argparse.Namespace) -> int:
    from pretrain.bench.vs_open_clip import OpenClipUnavailable
    from pretrain.config import embedded_config_path

    cfg = load_config(args.config or embedded_config_path(), args.overrides)
    try:
        res = run_bench(cfg, steps=args.steps, warmup=args.warmup, synthetic=args.synthetic, vs=args.vs,
                        vs_patch_dropout=args.vs_patch_dropout)
    except OpenClipUnavailable as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res), flush=True)
        return 0
    t = res["time_s"]
    print(f"{res['samples_per_s']} samples/s on {res['device']} ({res['precision']}, micro-batch "
          f"{res['micro_batch']}, {res['steps']} timed steps, {res['data_source']})")
    print("  time: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()) + f" of {res['wall_s']}s")
    print(f"  peak memory {res['memory']['peak_bytes'] / 2**20:.1f} MiB ({res['memory']['how']})")
    print(f"  {res['flops_per_sample'] / 1e9:.3f} GFLOP/sample (fwd+bwd), "
          f"{res['achieved_flops_per_s'] / 1e12:.4f} TFLOP/s achieved, MFU {res['mfu']:.2%} vs "
          f"{res['peak_flops_per_s'] / 1e12:.3f} TFLOP/s ({res['peak_source']})")
    vs = res.get("vs_open_clip")
    for row in [vs, (vs or {}).get("patch_dropout_run")]:
        if row:
            _print_vs(row)
    if vs:
        print(f"  parameters: open_clip {vs['parameters']:,}, ours {res['parameters']:,} of which "
              f"{vs['ours_shared_parameters']:,} in common (the rest: MAE decoder, MLM head)")
    return 0


def add_step_parser(bench: argparse._SubParsersAction) -> None:
    """`pretrain bench step` arguments (registered by `pretrain.bench.commands`)."""
    p = bench.add_parser("step", help="training-step throughput, time split, peak memory, FLOPs and MFU")
    p.add_argument("--config", help="YAML recipe (default: the embedded configs/demo.yaml)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--synthetic", action="store_true",
                   help="random batches even when data.train is set (model cost only)")
    p.add_argument("--vs", choices=["open_clip"],
                   help="also train open_clip_torch's CLIP (same shapes, batches, precision, steps) in this "
                        "process and report its samples/s and the ratio ours / open_clip")
    p.add_argument("--vs-patch-dropout", type=float, default=0.0, metavar="P",
                   help="with --vs: a second open_clip run with patch_dropout=P (its FLIP option)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_bench_step)
