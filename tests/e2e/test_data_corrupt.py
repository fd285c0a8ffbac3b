"""Corrupt data: truncated tar, garbage / truncated JPEG, missing or empty caption, non-UTF-8 text,
decompression bombs, unreadable shards -> skipped and counted by reason (exactly), run-wide totals in
metrics.jsonl / summary.json / TensorBoard, and the data.max_bad_fraction abort.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_data_corrupt.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datautil import EXPECTED_SKIPS as EXPECTED
from datautil import (
    good_members,
    image_bytes,
    tiny_tokenizer,
    write_corrupt_shards,
    write_tar,
)
from tiny import TINY, run_pretrain

from data_pipelines.audit import read_keys
from pretrain.metrics import read_metrics

ORDERED = ["data.shard_shuffle=false", "data.interleave=1", "data.shuffle_buffer=0"]


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[str, set[str]]:
    return write_corrupt_shards(tmp_path_factory.mktemp("corrupt"))


# ---------------------------------------------------------------------------------- through `pretrain`
def _train_args(run: Path, spec: str, steps: int, *extra: str) -> list[str]:
    return ["train", f"data.train={spec}", f"run.dir={run}", *TINY, "parallel.zero_stage=0",
            "data.workers=1", "train.micro_batch=2", f"train.steps={steps}", "data.max_image_pixels=1000000",
            "data.vocab_size=64", *extra]


@pytest.mark.slow
def test_training_over_corrupted_shards_reports_counts_by_reason(corrupt, tmp_path):
    spec, good = corrupt
    run = tmp_path / "run"
    r = run_pretrain(_train_args(run, spec, len(good) // 2, *ORDERED, "data.log_keys=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"] == EXPECTED
    assert summary["data"]["samples_delivered"] == len(good)
    assert summary["data"]["skip_bad_image"] == 3 and summary["data"]["skipped"] == 8
    rows = read_metrics(run)
    assert rows[-1]["skip_bad_shard"] == 3 and rows[-1]["skip_image_too_large"] == 1
    assert rows[-1]["bad_shard_frac"] == pytest.approx(3 / 5)
    assert sorted(k.key for k in read_keys(run)) == sorted(good)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/skip_bad_text")[-1].value == 1


@pytest.mark.slow
def test_mostly_bad_data_aborts_with_a_clear_error(tmp_path):
    members = []
    for i in range(40):
        members += [(f"k{i:03d}.jpg", image_bytes()), (f"k{i:03d}.txt", b"a cap" if i % 4 == 0 else b"")]
    write_tar(tmp_path / "bad.tar", members)
    write_tar(tmp_path / "vocab.tar", good_members("v", 30))  # the tokenizer needs some captions
    run = tmp_path / "run"
    r = run_pretrain(_train_args(run, f"{tmp_path}/bad.tar", 20, "data.max_bad_fraction=0.5",
                                 "data.bad_check_after=10", f"data.tokenizer={_tokenizer(tmp_path)}"))
    assert r.returncode != 0
    assert "DataQualityError" in r.stderr and "above data.max_bad_fraction=0.5" in r.stderr
    assert "empty_caption=" in r.stderr
    assert not (run / "summary.json").exists()
    assert read_metrics(run)[-1]["bad_sample_frac"] > 0.5


def _tokenizer(d: Path) -> str:
    path = d / "tokenizer.json"
    tiny_tokenizer().save(path)
    return str(path)
