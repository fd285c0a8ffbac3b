"""An eval stream whose whole share is bad (one DataLoader worker reading an all-corrupt shard) still reports
its skips: `pretrain embed` (.npz and --sharded) counts them, and the ranks' lock-step loop of `pretrain eval`
and validation (`encode_share`) reads past such a stream's zero-row batch, should a caller ask for them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datautil import good_members, image_bytes, write_tar
from tiny import write_tiny_weights

from data_pipelines.loader import make_eval_loader
from pretrain.evaluation.distributed import encode_share
from pretrain.evaluation.embed import embed

BAD = {"bad_image": 2, "missing_caption": 1}
"""What the bad shard holds: no usable sample."""


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("skip_only")
    write_tar(d / "shard-000000.tar", [("x0.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("x0.txt", b"a caption"),
                                       ("x1.jpg", b"\x00" * 300), ("x1.txt", b"a caption"),
                                       ("x2.jpg", image_bytes())])
    write_tar(d / "shard-000001.tar", good_members("g", 5))
    return write_tiny_weights(d / "weights", tiny_tok), f"{d}/shard-{{000000..000001}}.tar"


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_counts_the_skips_of_a_worker_without_a_usable_sample(setup, tmp_path, workers):
    """With 2 workers, worker 0 reads only the bad shard: it yielded no batch, and `pretrain embed`
    reported {} skipped (workers=0, one stream reading both shards, always counted them)."""
    weights, urls = setup
    info: dict = {}
    got = embed(weights, tmp_path / "emb.npz", data=urls, batch_size=2, workers=workers, info=info)
    assert list(got["keys"]) == [f"g{i:03d}" for i in range(5)]
    assert info["skipped"] == BAD


def test_sharded_embed_counts_them_and_writes_the_bad_shard_empty(setup, tmp_path):
    weights, urls = setup
    out = tmp_path / "emb"
    info: dict = {}
    embed(weights, out, data=urls, batch_size=2, workers=2, sharded=True, info=info)
    assert info["skipped"] == BAD
    assert json.loads((out / "index.json").read_text())["skips"] == BAD
    assert pq.read_metadata(out / "000000.parquet").num_rows == 0
    assert np.load(out / "000000.image.npy").shape[0] == 0
    assert pq.read_table(out / "000001.parquet")["key"].to_pylist() == [f"g{i:03d}" for i in range(5)]


@pytest.mark.parametrize("workers", [0, 2])
def test_sharded_skips_survive_a_run_that_stopped_before_its_index(setup, tmp_path, workers):
    """Each finished shard keeps its own skip counts (parquet metadata), so the index of a rerun after a
    run that stopped before writing index.json still counts them (it had counted only the rerun's own)."""
    from pretrain.evaluation.embed_store import shard_skips

    weights, urls = setup
    out = tmp_path / "emb"
    embed(weights, out, data=urls, batch_size=2, workers=workers, sharded=True)
    assert shard_skips(out, 0) == BAD and shard_skips(out, 1) == {}
    (out / "index.json").unlink()  # stopped after its shards, before its index
    info: dict = {}
    embed(weights, out, data=urls, batch_size=2, workers=workers, sharded=True, info=info)
    index = json.loads((out / "index.json").read_text())
    assert index["encoded_this_run"] == 0 and index["skips"] == BAD and info["skipped"] == BAD


def test_encode_share_reads_past_a_zero_row_batch(setup, tiny_tok):
    """The first batch of a 2-worker loader is worker 0's zero-row one: as a round it read as "no rank
    has a batch" and ended the loop before worker 1's real batches."""
    _, urls = setup
    loader = make_eval_loader(urls, tiny_tok, 32, 2, 16, [0.5] * 3, [0.5] * 3, workers=2, empty_batches=True)
    assert not next(iter(loader))["_keys"]

    def encode(batch, uniform):
        return {"image": batch["image"].flatten(1)[:, :4], "_order": batch["_order"]}

    rows = encode_share(loader, encode, torch.device("cpu"))
    assert rows["_order"].tolist() == [[1, i] for i in range(5)]
