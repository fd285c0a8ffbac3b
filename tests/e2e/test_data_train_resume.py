"""End to end through `pretrain train`: stop mid-epoch, resume with another data.workers, and check with the
key audit that epoch 0 was trained on exactly once -- including the audit's own crash consistency (lines
written after the checkpoint we resume from are dropped)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tiny import TINY, run_pretrain

from data_pipelines.audit import read_keys
from data_pipelines.synth import write_synthetic_shards

pytestmark = pytest.mark.slow


def _args(run: Path, urls: str, steps: int, workers: int) -> list[str]:
    return ["train", f"data.train={urls}", f"run.dir={run}", *TINY, "parallel.zero_stage=0",
            f"data.workers={workers}", "train.micro_batch=4", f"train.steps={steps}", "checkpoint.every=3",
            "data.log_keys=true", "data.vocab_size=128", "data.tokenizer_samples=48"]


def test_resume_with_other_workers_continues_with_exactly_the_unseen_samples(tmp_path):
    shards = write_synthetic_shards(tmp_path / "data", samples=48, samples_per_shard=12, image_size=32,
                                    seed=0)
    every = {f"s0_{i:09d}" for i in range(48)}
    run = tmp_path / "run"
    r = run_pretrain(_args(run, shards["urls"], steps=5, workers=1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {k.step for k in read_keys(run)} == {1, 2, 3, 4, 5}
    # resume from step 3 as if the job had died after step 5: steps 4-5 are trained again, not twice
    r = run_pretrain([*_args(run, shards["urls"], steps=24, workers=2),
                      "--resume", str(run / "checkpoints" / "global_step3")])
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_keys(run)
    assert Counter(k.step for k in records) == {s: 4 for s in range(1, 25)}
    epoch0 = Counter(k.key for k in records if k.epoch == 0)
    assert set(epoch0) == every and set(epoch0.values()) == {1}
    epoch1 = Counter(k.key for k in records if k.epoch == 1)
    assert epoch1 and set(epoch1.values()) == {1} and set(epoch1) <= every
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 3 and summary["data"]["samples_delivered"] == 96
