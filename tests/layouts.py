"""Shared bits for tests that change a run's (dp, tp) layout between steps: a tiny fp32 recipe whose global
batches are the same in every layout, its shards, and what the runs logged (losses, keys per step).

Same global batches in every layout: 4-sample shards, no sample shuffle, one open shard per stream, so
each step's global batch is 4 whole shards (16 samples: micro_batch 8 x dp 2, 16 x 1, 4 x 4) and a resume
re-deals the remaining global shard sequence. MLM/MIM masks and crops come from (seed, epoch, key).

The reference run that tests/e2e/test_resume_any_layout.py and test_universal_resume.py both resume,
convert and export is trained once per session (`layout_straight` in tests/conftest.py): STEPS steps at
(dp=2, tp=1), ZeRO-3 with every parameter partitioned, saved every EVERY steps with universal copies.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from tiny import run_pretrain

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
STEPS, EVERY = 9, 3  # the reference run: checkpoints at steps 3, 6 and 9


def tag(step: int) -> str:
    return f"global_step{step}"


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


def train(run_dir: Path, data: list[str], ranks: int = 2, tp: int = 1, steps: int = STEPS, extra=(),
          resume: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """`pretrain train` of the recipe on `ranks` ranks (tp x dp, global batch GLOBAL_BATCH) under the real
    deepspeed launcher; asserts it succeeded (or, `ok=False`, failed)."""
    args = ["train", f"run.dir={run_dir}", *SMALL, *data, f"parallel.tp={tp}", micro_batch(ranks // tp),
            f"train.steps={steps}", *extra] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=ranks, timeout=600)
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def only_checkpoint(src: Path, step: int, dst: Path) -> Path:
    """A run directory holding just run `src`'s checkpoint of `step`, as `latest` (as if the job had died
    after saving it): its DeepSpeed files only, no universal copy."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag(step), dst / "checkpoints" / tag(step))
    (dst / "checkpoints" / "latest").write_text(tag(step))
    return dst


def assert_continues(straight: Path, resumed: Path, start: int, end: int) -> None:
    """`resumed`, restarted from step `start`, logged steps start+1..end with `straight`'s losses (fp32, 1e-4
    relative: a missing Adam moment is off by ~1e-2 two steps on) and trained on exactly its samples."""
    ref, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(start + 1, end + 1)), f"{resumed.name} must log steps {start + 1}..{end}"
    for step in got:
        for k, v in ref[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4), (resumed.name, step, k, got[step][k], v)
    keys_ref, keys_got = keys_by_step(straight), keys_by_step(resumed)
    for step in got:
        assert keys_got[step] and keys_got[step] == keys_ref[step], f"{resumed.name}: step {step} samples"
