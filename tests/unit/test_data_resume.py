"""Exact mid-epoch resume, also elastic: keys consumed before the stop + keys after the resume == one
epoch, none twice, for 2 -> 1 and 1 -> 2 ranks, 2 -> 4 and 2 -> 1 workers, chained re-deals, and stops
while some streams are already in the next epoch. Ranks are simulated by calling make_train_loader with
(rank, world), exactly as the trainer does on each rank."""

from __future__ import annotations

import pytest
from datautil import assert_exactly_once, run_ranks, take, tiny_cfg, train_loader

from data_pipelines.synth import write_synthetic_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """5 large shards (8 samples) and 3 small ones (2 samples): streams finish epochs at different times."""
    root = tmp_path_factory.mktemp("resume")
    a = write_synthetic_shards(root / "a", samples=40, samples_per_shard=8, image_size=24, seed=0)
    b = write_synthetic_shards(root / "b", samples=6, samples_per_shard=2, image_size=24, seed=1)
    keys = {f"s0_{i:09d}" for i in range(40)} | {f"s1_{i:09d}" for i in range(6)}
    return {"urls": f"{a['urls']}::{b['urls']}", "keys": keys}


def _epochs_in(positions: list[dict]) -> set[int]:
    return {w["epoch"] for p in positions for w in p["workers"].values()}


@pytest.mark.parametrize("before,after", [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 1), (2, 2)),
                                          ((2, 2), (1, 0)), ((1, 1), (4, 1))])
def test_elastic_resume_reads_exactly_the_unseen_samples(data, tiny_tok, before, after):
    (w0, k0), (w1, k1) = before, after
    first, positions = run_ranks(tiny_cfg(data["urls"], workers=k0, batch=3), tiny_tok, w0, batches=3)
    assert 0 < len(first) < len(data["keys"])
    rest, _ = run_ranks(tiny_cfg(data["urls"], workers=k1, batch=3), tiny_tok, w1, until_epoch=2,
                        position=positions)
    assert_exactly_once(first + rest, 0, data["keys"])
    assert_exactly_once(first + rest, 1, data["keys"])  # the next epoch, fresh under the new layout


def test_resume_while_streams_straddle_two_epochs(data, tiny_tok):
    """Stop when some streams are in epoch 1 and others still in epoch 0; then re-deal twice."""
    cfg = tiny_cfg(data["urls"], workers=2, batch=2, buffer=2, interleave=1)
    first, positions = run_ranks(cfg, tiny_tok, 2, batches=11)
    assert _epochs_in(positions) == {0, 1}, "the test needs a stop across an epoch boundary"
    middle, positions = run_ranks(tiny_cfg(data["urls"], workers=1, batch=2), tiny_tok, 1, batches=2,
                                  position=positions)
    assert any(w["later"] for p in positions for w in p["workers"].values())  # still working off a re-deal
    rest, _ = run_ranks(tiny_cfg(data["urls"], workers=2, batch=5), tiny_tok, 2, until_epoch=3,
                        position=positions)
    keys = first + middle + rest
    for epoch in (0, 1, 2):
        assert_exactly_once(keys, epoch, data["keys"])


def test_resume_after_a_changed_shuffle_buffer_and_seed_is_still_exact(data, tiny_tok):
    first, positions = run_ranks(tiny_cfg(data["urls"], workers=2, batch=3, buffer=8), tiny_tok, 1, batches=4)
    rest, _ = run_ranks(tiny_cfg(data["urls"], workers=2, batch=3, buffer=3, seed=9), tiny_tok, 1,
                        until_epoch=1, position=positions)
    assert_exactly_once(first + rest, 0, data["keys"])


def test_same_layout_resume_inside_split_shards_gives_identical_batches(data, tiny_tok, tmp_path):
    """1 shard for 2 ranks x 2 workers (every 4th sample each): resume mid-shard, same batches."""
    one = write_synthetic_shards(tmp_path, samples=24, samples_per_shard=24, image_size=24, seed=2)
    cfg = tiny_cfg(one["urls"], workers=2, batch=2, buffer=4)
    reference = [train_loader(cfg, tiny_tok, rank=r, world=2) for r in (0, 1)]
    ref_batches = {r: take(reference[r], 5) for r in (0, 1)}
    positions = []
    for r in (0, 1):
        loader = train_loader(cfg, tiny_tok, rank=r, world=2)
        take(loader, 2)
        positions.append(loader.tracker.state())
    for r in (0, 1):
        resumed = take(train_loader(cfg, tiny_tok, rank=r, world=2, position=positions), 3)
        assert [b["_keys"] for b in resumed] == [b["_keys"] for b in ref_batches[r][2:]]
        assert all((b["image"] == w["image"]).all() for b, w in zip(resumed, ref_batches[r][2:]))
