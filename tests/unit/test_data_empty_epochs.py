"""A stream whose items give no usable sample (data_pipelines/empty_epochs.py): bad shards are left to the
run-wide data.max_bad_fraction check and never kill a rank by bad luck; a stream that can never deliver
fails with a clear error instead of spinning; a structural shortage names its real cause."""

from __future__ import annotations

import logging
import re
from itertools import islice
from pathlib import Path

import pytest
from datautil import good_members, tiny_cfg, tiny_tokenizer, train_loader, write_tar

from data_pipelines.empty_epochs import MAX_EMPTY_EPOCHS, starved_limit
from data_pipelines.monitor import merge_totals
from data_pipelines.stats import DataQualityError, check_bad_fraction


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.ERROR, logger="data_pipelines")  # thousands of counted bad-shard warnings


def _four_shards(d: Path, bad: int = 3, per_shard: int = 2) -> str:
    """s0..s3.tar with `per_shard` good samples each, except s{bad}.tar: not a tar at all."""
    d.mkdir(parents=True, exist_ok=True)
    for s in range(4):
        write_tar(d / f"s{s}.tar", good_members(f"s{s}_", per_shard))
    (d / f"s{bad}.tar").write_bytes(b"not a tar" * 100)
    return f"{d}/s{{0..3}}.tar"


def _totals(last_batches: list[dict]) -> dict:
    """Run-wide totals as the trainer merges them (monitor.merge_totals), from each rank's last batch."""
    return merge_totals([{"skips": b["_position"]["skips"], "delivered": b["_position"]["delivered"],
                          "shards": b["_position"]["shards"]} for b in last_batches])


@pytest.mark.parametrize("sampling, world", [("resampled", 4), ("epoch", 8)])
def test_a_stream_dealt_only_a_bad_shard_keeps_training(tmp_path, tok, sampling, world):
    """1 of 4 shards unreadable, one item per stream and epoch: every stream meets epochs with only the bad
    shard, and still every rank trains on (it used to raise after 3 such epochs, each rank at a different
    step); the run-wide fraction, 1 in 4 shard reads, is left to data.max_bad_fraction=0.5."""
    spec = _four_shards(tmp_path)
    last = []
    for rank in range(world):
        cfg = tiny_cfg(spec, batch=2)
        cfg.data.sampling = sampling
        batches = list(islice(iter(train_loader(cfg, tok, rank=rank, world=world)), 60))
        assert len(batches) == 60 and not any("s3_" in k for b in batches for k in b["_keys"])
        last.append(batches[-1])
    totals = _totals(last)
    bad, shards = totals["skips"]["bad_shard"], totals["shards"]
    assert 0.1 < bad / shards < 0.45, totals  # ~1 in 4: each bad read counted once (not per strided item)
    check_bad_fraction(totals["skips"], totals["delivered"], shards, max_fraction=0.5, min_samples=100)


def test_a_fixed_plan_that_deals_a_stream_only_bad_shards_fails_clearly(tmp_path, tok):
    """data.shard_shuffle=false: stream 3 (rank 1, worker 1) gets s3.tar every epoch and can never deliver.
    It fails in its DataLoader worker, with DataQualityError naming the shard, before its first batch --
    not by spinning forever while the other ranks wait for it."""
    spec = _four_shards(tmp_path)
    cfg = tiny_cfg(spec, workers=2, batch=2)
    cfg.data.shard_shuffle = False
    healthy = iter(train_loader(cfg, tok, rank=0, world=2))
    assert len(list(islice(healthy, 6))) == 6  # streams 0 and 2: fine
    it = iter(train_loader(cfg, tok, rank=1, world=2))
    assert set(next(it)["_keys"]) == {"s1_000", "s1_001"}  # worker 0 (stream 1, s1.tar) delivers first
    try:
        next(it)
        pytest.fail("stream 3 delivered from s3.tar")
    except DataQualityError as exc:
        message = str(exc)
        # torch's re-raise leaves the iterator in a cycle through this traceback: without this, a later
        # garbage collection shuts its workers down, with a 10 s timeout, in some other test
        exc.__traceback__ = None
    assert re.search(r"s3\.tar.*bad_shard.*3 epochs in a row.*same shard\(s\) \(data\.shard_shuffle=false\).*"
                     r"set data\.shard_shuffle=true", message), message
    del it, healthy


def test_a_stream_on_all_bad_data_gives_up_after_a_bounded_run(tmp_path, tok):
    """Every shard unreadable, shards drawn anew each epoch: nothing can be trained; the stream ends with a
    DataQualityError after starved_limit(max_bad_fraction) epochs instead of spinning without end."""
    for s in range(2):
        (tmp_path / f"b{s}.tar").write_bytes(b"garbage" * 50)
    cfg = tiny_cfg(f"{tmp_path}/b{{0..1}}.tar", batch=2)
    cfg.data.sampling = "resampled"  # 2 shards drawn per epoch
    cfg.data.max_bad_fraction = 0.5
    limit = starved_limit(0.5)
    with pytest.raises(DataQualityError, match=rf"epoch {limit - 1} .*'bad_shard': {2 * limit}}}\); {limit} "
                                               r"epochs in a row.*max_bad_fraction=0\.5"):
        next(iter(train_loader(cfg, tok, rank=0, world=1)))


def test_starved_limit_bounds_bad_luck_below_one_in_a_trillion():
    assert starved_limit(0.5) == 40 and 0.5 ** 40 < 1e-12 < 0.5 ** 39
    assert starved_limit(0.1) == 12 and starved_limit(0.0001) == MAX_EMPTY_EPOCHS
    assert starved_limit(1.0) == starved_limit(0.9) == 263  # check disabled: all-bad data still ends


def test_fewer_samples_than_streams_names_the_real_cause(tmp_path, tok):
    """Nothing is wrong with the shard: 3 samples for 4 streams, so stream 3's item (every 4th sample from
    the 4th) is empty in every epoch. The error says so instead of blaming bad data."""
    write_tar(tmp_path / "one.tar", good_members("k", 3))
    cfg = tiny_cfg(str(tmp_path / "one.tar"), batch=1)
    assert len(list(islice(iter(train_loader(cfg, tok, rank=0, world=4)), 3))) == 3
    expected = (r"no sample at all in epoch 2 .*nothing was skipped: each is every 4th sample of a shard.*"
                r"fewer samples than the 4 streams.*giving up")
    with pytest.raises(RuntimeError, match=expected) as info:
        next(iter(train_loader(cfg, tok, rank=3, world=4)))
    assert not isinstance(info.value, DataQualityError)
