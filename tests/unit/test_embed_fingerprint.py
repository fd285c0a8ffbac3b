"""`pretrain embed --sharded` resumes only into a folder made by the same run: the folder's embed.json
(checkpoint, backend, dtype, expanded shard list) must match, else the rerun is refused with one line naming
the folder and what differs. Before it, a rerun with another checkpoint or a shorter --data list exited 0
and left rows of two models (or of inputs no longer asked for) under one index.json."""

from __future__ import annotations

import json

import pytest
from datautil import good_members, write_tar
from tiny import write_tiny_weights

from pretrain.cli import main
from pretrain.evaluation.embed_store import FINGERPRINT, claim, fingerprint


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("embed_fingerprint")
    a = write_tiny_weights(d / "a", tiny_tok, seed=0)
    b = write_tiny_weights(d / "b", tiny_tok, seed=1)
    for s in range(2):
        write_tar(d / f"shard-{s:06d}.tar", good_members(f"s{s}_", 3))
    return a, b, d


def _embed(checkpoint, urls, out) -> list[str]:
    return ["embed", "--checkpoint", str(checkpoint), "--data", urls, "--out", str(out), "--sharded",
            "--workers", "0", "--batch-size", "4"]


def _refused(args, capsys) -> str:
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_sharded_resume_refuses_other_checkpoint(setup, tmp_path, capsys):
    a, b, d = setup
    urls, out = f"{d}/shard-{{000000..000001}}.tar", tmp_path / "emb"
    assert main(_embed(a, urls, out)) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["checkpoint"]["path"] == str(a.resolve()) and index["checkpoint"]["sha256"]
    (out / "000001.parquet").unlink()  # an interrupted run
    capsys.readouterr()
    err = _refused(_embed(b, urls, out), capsys)
    assert str(out) in err and "checkpoint" in err and str(b.resolve()) in err and "new --out" in err
    assert not (out / "000001.parquet").exists()  # nothing of model B was written
    assert main(_embed(a, urls, out)) == 0  # the same checkpoint resumes
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["encoded_this_run"] == 1


def test_sharded_resume_refuses_other_urls(setup, tmp_path, capsys):
    a, _, d = setup
    out = tmp_path / "emb"
    assert main(_embed(a, f"{d}/shard-{{000000..000001}}.tar", out)) == 0
    capsys.readouterr()
    err = _refused(_embed(a, f"{d}/shard-000001.tar", out), capsys)
    assert str(out) in err and "--data lists 2 input shards there, 1 now" in err
    assert "shard-000000.tar there" in err and "shard-000001.tar now" in err
    index = json.loads((out / "index.json").read_text())
    assert [e["url"] for e in index["shards"]] == [f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]


def test_claim_refuses_other_backend_and_a_folder_without_fingerprint(setup, tmp_path):
    a, _, d = setup
    urls, out = f"{d}/shard-000000.tar", tmp_path / "emb"
    torch_fp = fingerprint(a, "torch", "fp32", urls)
    claim(out, torch_fp)
    assert json.loads((out / FINGERPRINT).read_text()) == torch_fp
    claim(out, fingerprint(a, "onnx", "int8", urls))  # no output shard yet: nothing to mix, taken over
    (out / "000000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--backend onnx there, torch now.*new --out"):
        claim(out, torch_fp)
    claim(out, fingerprint(a, "onnx", "int8", urls))  # the same run resumes
    (out / FINGERPRINT).unlink()  # a folder written before fingerprints existed
    with pytest.raises(ValueError, match=f"--out {out} holds embeddings of another run .*no {FINGERPRINT}"):
        claim(out, torch_fp)
