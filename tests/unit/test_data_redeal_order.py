"""The elastic re-deal continues the global item sequence: when every old stream stopped at an item
boundary, the new streams' items, read round-robin, are exactly the old layout's unread items in the
order the fresh epoch dealt them (what lets a resumed run under a new layout see the same global batches
as the straight run: tests/e2e/test_resume_any_layout.py)."""

from __future__ import annotations

import pytest

from data_pipelines.plan import PlanParams, StreamState, _epoch_items, redeal, remaining_work


@pytest.mark.parametrize(("old", "new"), [(2, 1), (2, 4), (4, 2), (3, 5)])
def test_redeal_keeps_global_order_at_item_boundaries(old, new):
    params = PlanParams(num_shards=40, seed=7, shard_shuffle=True, block=4)
    consumed = 3  # every old stream finished its first 3 items
    states = {g: StreamState(epoch=0, opened=consumed) for g in range(old)}
    global_order = list(_epoch_items(params, 0, old))
    unread = [it for i, it in enumerate(global_order) if i // old >= consumed]

    dealt = redeal(remaining_work(states, params, old), new)
    lists = [dealt[g].items for g in range(new)]
    round_robin = [lists[g][i] for i in range(max(map(len, lists))) for g in range(new) if i < len(lists[g])]
    assert round_robin == unread


def test_open_items_come_first_with_their_progress():
    params = PlanParams(num_shards=8, seed=0, shard_shuffle=False, block=4)
    states = {0: StreamState(epoch=0, opened=1, open=[[0, 2]]), 1: StreamState(epoch=0, opened=0)}
    work = remaining_work(states, params, 2)[0]
    assert work[0].shard == 0 and work[0].start == 2  # stream 0's half-read shard, then the rest in order
    assert [it.shard for it in work[1:]] == [1, 2, 3, 4, 5, 6, 7]
