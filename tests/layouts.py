"""Shared bits for tests that change a run's (dp, tp) layout between steps: a tiny fp32 recipe whose global
batches are the same in every layout, its shards, and what the runs logged (losses, keys per step).

Same global batches in every layout: 4-sample shards, no sample shuffle, one open shard per stream, so
each step's global batch is 4 whole shards (16 samples: micro_batch 8 x dp 2, 16 x 1, 4 x 4) and a resume
re-deals the remaining global shard sequence. MLM/MIM masks and crops come from (seed, epoch, key).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from data_pipelines.audit import read_keys
from pretrain.metrics import read_metrics

SMALL = [
    "model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1",
    "model.vision.heads=2", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.context_length=16", "model.embed_dim=16", "model.decoder.width=16", "model.decoder.layers=1",
    "model.decoder.heads=2", "data.workers=1", "data.shuffle_buffer=0", "data.interleave=1",
    "data.log_keys=true", "train.precision=fp32", "optim.warmup_steps=2", "optim.lr=2e-3", "logging.every=1",
    "logging.progress=false", "logging.tensorboard=false", "parallel.zero_stage=3",
    "parallel.persistence_threshold=0",
]
GLOBAL_BATCH = 16
LOSS_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm")


def write_layout_data(d: Path, steps: int) -> list[str]:
    """Shards for `steps` global batches and a tokenizer trained on them: the data.* overrides."""
    from data_pipelines.synth import write_synthetic_shards
    from data_pipelines.tokenizer import train_tokenizer_from_shards

    out = write_synthetic_shards(d / "train", samples=GLOBAL_BATCH * steps, samples_per_shard=4,
                                 image_size=16, seed=0)
    tok = train_tokenizer_from_shards(out["urls"], 128, 1000)
    tok.save(d / "tokenizer.json")
    return [f"data.train={out['urls']}", f"data.tokenizer={d / 'tokenizer.json'}"]


def micro_batch(dp: int) -> str:
    """The train.micro_batch override that keeps the global batch at GLOBAL_BATCH under `dp` DP ranks."""
    return f"train.micro_batch={GLOBAL_BATCH // dp}"


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the losses logged at that step."""
    return {row["step"]: {k: row[k] for k in LOSS_KEYS} for row in read_metrics(run_dir) if "loss" in row}


def keys_by_step(run_dir: Path) -> dict[int, set[str]]:
    """step -> the `epoch/key` of every sample trained on at that step (data.log_keys audit)."""
    out: dict[int, set[str]] = defaultdict(set)
    for rec in read_keys(run_dir):
        out[rec.step].add(f"{rec.epoch}/{rec.key}")
    return out
