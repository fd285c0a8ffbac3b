"""`pretrain embed --backend onnx --workers N --sharded`: the ONNX backend gives the eager embeddings, decode
workers keep input order, undecodable images are counted not fatal, and a sharded run resumes without
re-encoding finished shards (a tiny random-weight model: speed is not what is tested)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from datautil import good_members, write_tar
from tiny import write_tiny_weights

from pretrain.cli import main
from pretrain.evaluation.embed import embed


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("embed_backends")
    weights = write_tiny_weights(d / "weights", tiny_tok)
    for s in range(3):
        members = good_members(f"s{s}_", 7)
        if s == 1:  # one undecodable image in the middle shard
            members[4:6] = [("s1_bad.jpg", b"\xff\xd8\xff not a jpeg"), ("s1_bad.txt", b"a caption")]
        write_tar(d / f"shard-{s:06d}.tar", members)
    return weights, f"{d}/shard-{{000000..000002}}.tar"


def test_onnx_backend_equals_torch_and_workers_keep_order(setup, tmp_path):
    weights, urls = setup
    ref = embed(weights, tmp_path / "torch.npz", data=urls, batch_size=4, workers=0)
    info: dict = {}
    got = embed(weights, tmp_path / "onnx.npz", data=urls, batch_size=4, backend="onnx", workers=2, info=info)
    assert list(got["keys"]) == list(ref["keys"]) and len(ref["keys"]) == 20
    np.testing.assert_allclose(got["image"], ref["image"], atol=2e-5)
    np.testing.assert_allclose(got["text"], ref["text"], atol=2e-5)
    assert info["skipped"] == {"bad_image": 1}
    with np.load(tmp_path / "onnx.npz") as z:
        assert set(z.files) == {"image", "text", "keys"}  # the .npz keys of the torch backend, unchanged


def test_int8_backend_stays_close(setup, tmp_path):
    weights, urls = setup
    ref = embed(weights, tmp_path / "torch.npz", data=urls, max_samples=8, workers=0)
    got = embed(weights, tmp_path / "int8.npz", data=urls, max_samples=8, backend="onnx", dtype="int8")
    assert list(got["keys"]) == list(ref["keys"])
    assert (got["image"] * ref["image"]).sum(1).min() > 0.98


def test_sharded_output_and_resume(setup, tmp_path, capsys):
    weights, urls = setup
    out = tmp_path / "emb"
    args = ["embed", "--checkpoint", str(weights), "--data", urls, "--out", str(out), "--sharded",
            "--backend", "onnx", "--workers", "2", "--batch-size", "4"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 20 and summary["shards"] == 3 and summary["encoded_this_run"] == 3
    assert summary["skipped"] == 1
    ref = embed(weights, tmp_path / "ref.npz", data=urls, batch_size=4)
    image = np.concatenate([np.load(out / f"{i:06d}.image.npy") for i in range(3)])
    keys = [k for i in range(3) for k in pq.read_table(out / f"{i:06d}.parquet")["key"].to_pylist()]
    assert keys == list(ref["keys"])
    np.testing.assert_allclose(image, ref["image"], atol=2e-5)
    # interrupted after shard 0: shard 1 and 2 are encoded again, shard 0 is not touched
    for i in (1, 2):
        (out / f"{i:06d}.parquet").unlink()
    before = os.stat(out / "000000.image.npy").st_mtime_ns
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded_this_run"] == 2 and summary["rows"] == 20
    assert os.stat(out / "000000.image.npy").st_mtime_ns == before


@pytest.mark.parametrize("extra, message", [
    (["--backend", "torch", "--dtype", "int8"], "fp16/int8 run through --backend onnx"),
    (["--sharded", "--max-samples", "3"], "--max-samples applies to .npz output"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_bad_arguments(setup, tmp_path, capsys, extra, message):
    weights, urls = setup
    assert main(["embed", "--checkpoint", str(weights), "--data", urls, "--out", str(tmp_path / "o"),
                 *extra]) != 0
    assert message in capsys.readouterr().err
