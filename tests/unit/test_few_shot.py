"""Few-shot probe (`pretrain eval --linear-probe TRAIN --few-shot K`): the seeded K-per-class draw, C by
leave-one-shot-out, K = 1 as the class-mean classifier, errors naming short classes, and the whole path
through `evaluate` on real tiny shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import MICRO

from data_pipelines.synth import CLASSNAMES
from pretrain.cli import main
from pretrain.config.loading import load_config
from pretrain.evaluation.evaluate import evaluate
from pretrain.evaluation.probe import C_GRID, few_shot_indices, few_shot_probe
from pretrain.models.pretrain_model import PretrainModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 16))
    y = np.arange(n) % classes
    x = centres[y] + noise * rng.normal(size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_k_per_class_drawn_seeded_and_counted():
    _, y = _blobs(200, 5, 0.1, 0)
    idx = few_shot_indices(y, 3, np.arange(5), seed=0)
    assert len(idx) == 15 and len(set(idx)) == 15
    assert [int((y[idx] == c).sum()) for c in range(5)] == [3] * 5
    assert (idx == few_shot_indices(y, 3, np.arange(5), seed=0)).all()
    assert not (idx == few_shot_indices(y, 3, np.arange(5), seed=1)).all()


def test_separable_features_few_shot_and_random_labels_not():
    x, y = _blobs(600, 5, 0.3, 0)
    r = few_shot_probe(x[:400], y[:400], x[400:], y[400:], 4)
    assert r["few_shot_top1"] > 0.9 and r["few_shot_k"] == 4 and r["few_shot_train_samples"] == 20
    assert r["few_shot_c"] in C_GRID and r["few_shot_val_top1"] is not None
    shuffled = np.random.default_rng(1).permutation(y)
    r = few_shot_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 4)
    assert r["few_shot_top1"] < 0.4  # chance 0.2


def test_one_shot_is_the_class_mean_classifier():
    """K = 1: no held-out sample exists, so C is the grid's smallest, where logistic regression's
    decisions approach nearest-prototype (cosine to each class's one sample)."""
    x, y = _blobs(400, 6, 0.8, 3)
    r = few_shot_probe(x[:200], y[:200], x[200:], y[200:], 1)
    assert r["few_shot_c"] == min(C_GRID) and r["few_shot_val_top1"] is None
    idx = few_shot_indices(y[:200], 1, np.arange(6), seed=0)
    protos = x[:200][idx]  # one per class, in class order
    nearest = (x[200:] @ protos.T).argmax(axis=1)
    assert abs(r["few_shot_top1"] - float((nearest == y[200:]).mean())) <= 0.02


def test_classes_with_too_few_samples_are_named():
    x, y = _blobs(60, 3, 0.1, 0)
    keep = (y != 2) | (np.arange(60) < 6)  # class 2 keeps two samples
    with pytest.raises(ValueError, match=r"fewer than 3 labelled train samples: 'blue circle' \(2\)"):
        few_shot_probe(x[keep], y[keep], x, y, 3, ["red circle", "red square", "blue circle"])
    test_y = y.copy()
    test_y[0] = 7  # a test class the train features lack
    with pytest.raises(ValueError, match=r"'class 7' \(0\)"):
        few_shot_probe(x, y, x, test_y, 2)
    with pytest.raises(ValueError, match="K must be >= 1"):
        few_shot_probe(x, y, x, y, 0)


def test_through_evaluate_on_real_shards(shards, tiny_tok):
    cfg = load_config(None, [o for o in MICRO if not o.startswith("data.")])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tiny_tok).eval()
    train = shards["train"].replace("{000000..000007}", "{000000..000003}")  # 320 samples, 32 classes
    out = evaluate(None, shards["val"], shards["classnames"], batch_size=64, linear_probe=train, few_shot=2,
                   model_bundle=(model, tiny_tok, cfg))
    assert out["few_shot_k"] == 2 and out["few_shot_train_samples"] == 2 * len(CLASSNAMES)
    assert 0.0 <= out["few_shot_top1"] <= 1.0 and "linear_probe_top1" in out
    with pytest.raises(ValueError, match="fewer than 50 labelled train samples"):
        evaluate(None, shards["val"], shards["classnames"], batch_size=64, linear_probe=train, few_shot=50,
                 model_bundle=(model, tiny_tok, cfg))


def test_cli_needs_the_train_shards(capsys):
    assert main(["eval", "--checkpoint", "x", "--data", "y", "--few-shot", "4"]) == 2
    assert "--few-shot K draws K labelled samples per class from --linear-probe" in capsys.readouterr().err
