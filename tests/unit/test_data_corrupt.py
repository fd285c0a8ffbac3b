"""Corrupt data: truncated tar, garbage / truncated JPEG, missing or empty caption, non-UTF-8 text,
decompression bombs, unreadable shards -> skipped and counted by reason (exactly), run-wide totals in
metrics.jsonl / summary.json / TensorBoard, and the data.max_bad_fraction abort.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_data_corrupt.py.
"""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
from datautil import EXPECTED_SKIPS as EXPECTED
from datautil import (
    tiny_cfg,
    tiny_tokenizer,
    train_loader,
    write_corrupt_shards,
)

from data_pipelines.stats import DataQualityError, check_bad_fraction


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[str, set[str]]:
    return write_corrupt_shards(tmp_path_factory.mktemp("corrupt"))


def _ordered_cfg(spec: str, batch: int):
    cfg = tiny_cfg(spec, workers=0, batch=batch, buffer=0, interleave=1)
    cfg.data.shard_shuffle = False
    cfg.data.max_image_pixels = 1_000_000
    return cfg


def test_every_kind_of_corruption_is_skipped_and_counted_exactly(corrupt):
    spec, good = corrupt
    loader = train_loader(_ordered_cfg(spec, batch=2), tiny_tokenizer(), rank=0, world=1)
    batches = list(islice(iter(loader), len(good) // 2))
    assert sorted(k for b in batches for k in b["_keys"]) == sorted(good)
    last = batches[-1]
    assert last["_skips"] == EXPECTED
    assert last["_position"]["delivered"] == len(good) and last["_position"]["shards"] == 5


def test_counts_continue_across_a_resume(corrupt):
    spec, good = corrupt
    tok = tiny_tokenizer()
    loader = train_loader(_ordered_cfg(spec, batch=2), tok, rank=0, world=1)
    for batch in islice(iter(loader), 7):
        loader.tracker.update(batch)
    saved = loader.tracker.state()
    # resume under another layout (2 workers): totals carry over instead of restarting at zero
    cfg = _ordered_cfg(spec, batch=2)
    cfg.data.workers = 2
    resumed = train_loader(cfg, tok, rank=0, world=1, position=[saved])
    start = resumed.tracker.skip_counts()
    assert sum(c["delivered"] for c in start.values()) == 14
    assert Counter(saved["workers"]["0"]["skips"]) == sum((Counter(c["skips"]) for c in start.values()),
                                                          Counter())


def test_bad_fraction_check():
    skips = {"bad_image": 6, "bad_shard": 1}
    check_bad_fraction(skips, delivered=4, shards=10, max_fraction=0.7, min_samples=5)  # 60% < 70%
    check_bad_fraction(skips, delivered=4, shards=10, max_fraction=0.5, min_samples=11)  # too early
    with pytest.raises(DataQualityError, match=r"6 of 10 samples \(60.0%\).*max_bad_fraction=0.5"
                                                r".*bad_image=6"):
        check_bad_fraction(skips, delivered=4, shards=10, max_fraction=0.5, min_samples=10)
    with pytest.raises(DataQualityError, match=r"3 of 4 shard reads"):  # shards: 75% unreadable
        check_bad_fraction({"bad_shard": 3}, delivered=100, shards=4, max_fraction=0.5, min_samples=10)
    check_bad_fraction({"bad_shard": 3}, delivered=100, shards=4, max_fraction=1.0, min_samples=0)


# ---------------------------------------------------------------------------------- through `pretrain`
