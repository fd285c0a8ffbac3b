"""Linear probe (`pretrain eval --linear-probe`): the C sweep and fit on known features, and the whole
path on real tiny shards: frozen features of a tiny model, then the CLI on a one-step checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import MICRO, run_pretrain, train_args, write_micro_shards

from data_pipelines.synth import CLASSNAMES
from pretrain.cli import main
from pretrain.config.loading import load_config
from pretrain.evaluation.probe import C_GRID, _split, labelled_image_features, linear_probe
from pretrain.models.pretrain_model import PretrainModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 16))
    y = rng.integers(0, classes, n)
    x = centres[y] + noise * rng.normal(size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_separable_features_are_learned_and_random_labels_are_not():
    x, y = _blobs(600, 5, 0.2, 0)
    r = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert r["linear_probe_top1"] > 0.95
    assert r["linear_probe_train_samples"] == 400 and r["linear_probe_test_samples"] == 200
    assert r["linear_probe_c"] in C_GRID
    shuffled = np.random.default_rng(1).permutation(y)
    r = linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:])
    assert r["linear_probe_top1"] < 0.4  # chance is 0.2


def test_c_is_chosen_on_held_out_train_features_only():
    """The eval labels never influence C: scrambling them changes the score, not the choice."""
    x, y = _blobs(300, 4, 1.0, 2)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:])
    b = linear_probe(x[:200], y[:200], x[200:], np.zeros(100, dtype=np.int64))
    assert a["linear_probe_c"] == b["linear_probe_c"]
    fit, held = _split(y[:200], 0.2, 0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 200
    assert set(np.unique(y[:200][held])) == set(np.unique(y[:200]))  # stratified


def test_features_of_a_tiny_model_on_real_shards(shards, tiny_tok):
    cfg = load_config(None, [o for o in MICRO if not o.startswith("data.")])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tiny_tok).eval()
    tx, ty = labelled_image_features(model, tiny_tok, cfg, shards["train"], batch_size=64, max_samples=320)
    vx, vy = labelled_image_features(model, tiny_tok, cfg, shards["val"], batch_size=64)
    assert tx.shape == (320, cfg.model.embed_dim) and vx.shape == (128, cfg.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(tx, axis=1), 1.0, atol=1e-5)
    assert ty.min() >= 0 and ty.max() < len(CLASSNAMES)
    r = linear_probe(tx, ty, vx, vy)
    # even random-init features of the coloured shapes carry their colour: far above 1/32 chance
    assert r["linear_probe_top1"] > 3 / len(CLASSNAMES)


def test_cli_reports_linear_probe_next_to_the_existing_keys(tmp_path, capsys):
    shards = write_micro_shards(tmp_path / "shards")  # 4 shards: 3 to fit, 1 to score
    r = run_pretrain(["train", *train_args(shards, tmp_path / "run", 1, "data.workers=0")])
    assert r.returncode == 0, r.stderr[-3000:]
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    assert main(["eval", "--checkpoint", str(tmp_path / "run"),
                 "--data", f"{tmp_path}/shards/shard-000003.tar",
                 "--classnames", str(names), "--json",
                 "--linear-probe", f"{tmp_path}/shards/shard-{{000000..000002}}.tar"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "samples",
                "linear_probe_top1", "linear_probe_c"):
        assert key in out
    assert 0.0 <= out["linear_probe_top1"] <= 1.0 and out["linear_probe_train_samples"] == 240
