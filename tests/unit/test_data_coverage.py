"""Exact epoch coverage: every sample once per epoch across ranks x workers, for many layouts, including
fewer shards than streams, uneven shard sizes, mixed local / pipe: / http sources; resampled mixing."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import pytest
from datautil import assert_exactly_once, run_ranks, tiny_cfg, train_loader

from data_pipelines.synth import write_synthetic_shards

# more DataLoader workers than this machine's cores is the point of some layouts here
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> dict:
    """6 shards of unequal sizes (8, 8, 8, 8, 3, 2 samples), two sources joined with `::`."""
    root = tmp_path_factory.mktemp("uneven")
    a = write_synthetic_shards(root / "a", samples=32, samples_per_shard=8, image_size=24, seed=0)
    b = write_synthetic_shards(root / "b", samples=5, samples_per_shard=3, image_size=24, seed=1)
    keys = {f"s0_{i:09d}" for i in range(32)} | {f"s1_{i:09d}" for i in range(5)}
    return {"urls": f"{a['urls']}::{b['urls']}", "keys": keys, "a": a, "b": b}


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 3), (3, 1)])
def test_every_sample_once_per_epoch(uneven, tiny_tok, world, workers):
    cfg = tiny_cfg(uneven["urls"], workers=workers, batch=3)
    keys, _ = run_ranks(cfg, tiny_tok, world, until_epoch=2)
    assert_exactly_once(keys, 0, uneven["keys"])
    assert_exactly_once(keys, 1, uneven["keys"])
    # epochs are reshuffled: the first samples of epoch 1 are not those of epoch 0
    first = [[k for e, k in keys if e == ep][:6] for ep in (0, 1)]
    assert first[0] != first[1]


@pytest.mark.parametrize("world,workers", [(2, 4), (4, 2)])
def test_fewer_shards_than_streams_splits_within_shards(uneven, tiny_tok, world, workers):
    """3 shards for 8 streams: each shard is read as every 3rd sample by 3 streams; still exact."""
    three = f"{uneven['a']['files'][0]}::{uneven['a']['files'][1]}::{uneven['b']['files'][0]}"
    expected = {f"s0_{i:09d}" for i in range(16)} | {f"s1_{i:09d}" for i in range(3)}
    cfg = tiny_cfg(three, workers=workers, batch=2, buffer=4)
    keys, positions = run_ranks(cfg, tiny_tok, world, until_epoch=1)
    assert_exactly_once(keys, 0, expected)
    assert positions[0]["workers"]["0"]["delivered"] > 0


def test_mixed_local_pipe_and_http_sources(uneven, tiny_tok):
    files = uneven["a"]["files"]
    folder = uneven["a"]["out_dir"]
    handler = functools.partial(_QuietHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        spec = (f"http://127.0.0.1:{port}/shard-{{000000..000001}}.tar::pipe:cat {files[2]}::{files[3]}"
                f"::http://127.0.0.1:{port}/missing.tar")
        cfg = tiny_cfg(spec, workers=2, batch=4)
        keys, positions = run_ranks(cfg, tiny_tok, 1, until_epoch=1)
    finally:
        server.shutdown()
    assert_exactly_once(keys, 0, {f"s0_{i:09d}" for i in range(32)})
    skips = Counter()
    for w in positions[0]["workers"].values():
        skips.update(w["skips"])
    assert skips["bad_shard"] >= 1  # the 404 shard is counted, not fatal


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_resampled_mixes_sources_by_weight(uneven, tiny_tok):
    a, b = uneven["a"]["urls"], uneven["b"]["urls"]  # 4 shards x 8 samples and 2 shards (3 + 2)
    cfg = tiny_cfg(f"{a}::{b}", workers=0, batch=8)
    cfg.data.sampling = "resampled"
    cfg.data.train_weights = [1.0, 3.0]
    loader = train_loader(cfg, tiny_tok, rank=0, world=1)
    keys = [k for b in _batches(loader, 60) for k in b["_keys"]]
    from_b = sum(k.startswith("s1_") for k in keys) / len(keys)
    # source b holds 5 of 37 samples but draws 3/4 of the shards; its shards are small, so per sample
    # its share is 0.75*2.5 / (0.75*2.5 + 0.25*8) = 0.48
    assert 0.35 < from_b < 0.62, from_b
    assert max(Counter(keys).values()) > 1  # with replacement
    cfg.data.train_weights = []
    keys = [k for b in _batches(train_loader(cfg, tiny_tok, rank=0, world=1), 60) for k in b["_keys"]]
    assert sum(k.startswith("s1_") for k in keys) / len(keys) < 0.2


def _batches(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out
