"""The plan and cursor without tars or decoding: exact coverage and exact elastic re-deal over many random
layouts, shard sizes (including empty shards and fewer shards than streams) and stop points."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data_pipelines import cursor as cursor_mod
from data_pipelines.cursor import StreamCursor
from data_pipelines.plan import PlanParams, StreamState, fresh_items, redeal, remaining_work
from data_pipelines.stats import SkipCounter


@pytest.fixture
def memory_shards(monkeypatch):
    """Shards as in-memory lists: url "mem:i" holds keys "i/0" ... "i/(size-1)"."""
    sizes: dict[str, int] = {}

    def fake(urls, skips, select_files=None, max_bytes=0):
        (url,) = urls
        return iter([{"__key__": f"{url[4:]}/{j}"} for j in range(sizes[url])])

    monkeypatch.setattr(cursor_mod, "shard_samples", fake)
    return sizes


def _pull(params, states, streams, interleave, until=None, counts=None):
    """Read from every stream: `counts[g]` samples (or up to epoch 3: some streams only hold empty
    shards), or until it reaches epoch `until`."""
    urls = [f"mem:{i}" for i in range(params.num_shards)]
    seen = []
    for g, state in states.items():
        cur = StreamCursor(urls, params, state, g, streams, interleave, SkipCounter())
        taken = 0
        while (until is None and taken < counts[g] and state.epoch < 3) or \
                (until is not None and state.epoch < until):
            sample = cur.next_in_epoch()
            if sample is None:
                cur.next_epoch()
                continue
            seen.append((state.epoch, sample["__key__"]))
            taken += 1
    return seen


def _check(seen, sizes, epochs):
    every = {f"{i}/{j}" for i, n in enumerate(sizes) for j in range(n)}
    for epoch in epochs:
        counts = Counter(k for e, k in seen if e == epoch)
        assert set(counts) == every and set(counts.values()) <= {1}, (epoch, counts, every)


def test_fresh_items_partition_every_epoch():
    for shards in range(1, 9):
        for streams in range(1, 13):
            params = PlanParams(num_shards=shards, seed=3, shard_shuffle=True, block=4)
            for epoch in range(3):
                items = [it for g in range(streams) for it in fresh_items(params, epoch, g, streams)]
                assert all(fresh_items(params, epoch, g, streams) for g in range(streams))  # nobody idles
                cover = Counter((it.shard, j) for it in items for j in range(it.phase, 40, it.stride))
                assert set(cover.values()) == {1} and {s for s, _ in cover} == set(range(shards))


def test_random_stops_and_elastic_redeals_are_exact(memory_shards):
    rng = random.Random(0)
    for trial in range(200):
        sizes = [rng.choice([0, 1, 3, 5, 8, 13]) for _ in range(rng.randint(1, 7))]
        memory_shards.clear()
        memory_shards.update({f"mem:{i}": n for i, n in enumerate(sizes)})
        if not sum(sizes):
            continue
        old_n, new_n = rng.randint(1, 9), rng.randint(1, 9)
        old = PlanParams(num_shards=len(sizes), seed=trial, shard_shuffle=True, block=rng.choice([1, 2, 4]))
        new = PlanParams(num_shards=len(sizes), seed=rng.choice([trial, 99]), shard_shuffle=True,
                         block=rng.choice([1, 3]))
        states = {g: StreamState() for g in range(old_n)}
        first = _pull(old, states, old_n, rng.randint(1, 3),
                      counts={g: rng.randint(0, 2 * sum(sizes) // old_n + 2) for g in range(old_n)})
        work = remaining_work(states, old, old_n)
        resumed = redeal(work, new_n)
        rest = _pull(new, resumed, new_n, rng.randint(1, 3), until=max(work, default=0) + 2)
        _check(first + rest, sizes, range(max(work, default=0) + 1))


def test_same_state_continues_identically(memory_shards):
    memory_shards.update({f"mem:{i}": n for i, n in enumerate([7, 2, 9, 4])})
    params = PlanParams(num_shards=4, seed=1, shard_shuffle=True, block=3)
    straight = _pull(params, {0: StreamState()}, 1, 2, counts={0: 30})
    state = StreamState()
    head = _pull(params, {0: state}, 1, 2, counts={0: 11})
    restored = StreamState.from_dict(state.as_dict(0))
    assert head + _pull(params, {0: restored}, 1, 2, counts={0: 19}) == straight
