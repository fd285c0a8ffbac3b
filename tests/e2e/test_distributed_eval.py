"""`pretrain eval` under the real torchrun launcher at 2 and 4 ranks equals the single-process result
exactly: uneven shard counts (8 + 8 + 3 samples), a --max-samples cap, fewer samples than ranks, and the
linear probe (features encoded by every rank, fitted once on rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import ROOT

from data_pipelines.synth import write_synthetic_shards
from data_pipelines.tokenizer import train_tokenizer_from_shards
from launch.rendezvous import free_port
from pretrain.checkpoint.sources import DictSource
from pretrain.checkpoint.universal import write_weights
from pretrain.config import embedded_config_path, load_config, to_dict
from pretrain.evaluation.evaluate import evaluate
from pretrain.models.pretrain_model import PretrainModel

pytestmark = [pytest.mark.slow, pytest.mark.dist]
SMALL = ["model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1",
         "model.vision.heads=2", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=16", "model.decoder.width=16",
         "model.decoder.layers=1", "model.decoder.heads=2", "train.precision=fp32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    """A random-weights export of a small model (what is evaluated does not need to be trained for the
    results to be compared) and three shard sets."""
    d = tmp_path_factory.mktemp("deval")
    val = write_synthetic_shards(d / "val", samples=19, samples_per_shard=8, image_size=16, seed=1)
    tiny = write_synthetic_shards(d / "tiny", samples=3, samples_per_shard=3, image_size=16, seed=2)
    train = write_synthetic_shards(d / "train", samples=90, samples_per_shard=30, image_size=16, seed=3)
    tok = train_tokenizer_from_shards(train["urls"], 128, 200)
    cfg = load_config(embedded_config_path(), SMALL)
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok)
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random init"), d / "weights")
    return {"weights": str(d / "weights"), "val": val["urls"], "tiny": tiny["urls"], "train": train["urls"],
            "classnames": str(d / "val" / "classnames.txt")}


def _torchrun(procs: int, args: list[str]) -> dict:
    port = free_port()  # this worker's window (tests/conftest.py), clear of the Slurm tests' 29500+
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={procs}",
           f"--master-port={port}",
           "-m", "pretrain.cli", "eval", *args, "--batch-size", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 prints, the others do not
    return _metrics(json.loads(lines[0]))


def _metrics(result: dict) -> dict:
    """Everything but the timing."""
    assert result["seconds"] > 0 and result["images_per_s"] > 0
    return {k: v for k, v in result.items() if k not in ("seconds", "images_per_s")}


def _single(s: dict[str, str], data: str, **kw) -> dict:
    return _metrics(evaluate(s["weights"], s[data], s["classnames"], batch_size=5, **kw))


def test_two_ranks_uneven_shards_with_probe(setup):
    one = _single(setup, "val", linear_probe=setup["train"])
    two = _torchrun(2, ["--checkpoint", setup["weights"], "--data", setup["val"], "--classnames",
                        setup["classnames"], "--linear-probe", setup["train"]])
    assert one["samples"] == 19 and one["linear_probe_train_samples"] == 90
    assert one["skipped"] == one["linear_probe_train_skipped"] == {}  # clean shards; see test_eval_skips
    assert two == one


def test_four_ranks_with_a_cap(setup):
    one = _single(setup, "val", max_samples=11)
    four = _torchrun(4, ["--checkpoint", setup["weights"], "--data", setup["val"], "--classnames",
                         setup["classnames"], "--max-samples", "11"])
    assert one["samples"] == 11 and one["skipped"] == {}
    assert four == one


def test_fewer_samples_than_ranks(setup):
    one = _single(setup, "tiny")
    four = _torchrun(4, ["--checkpoint", setup["weights"], "--data", setup["tiny"], "--classnames",
                         setup["classnames"]])
    assert one["samples"] == 3
    assert four == one
