"""What `few_shot_probe`'s docstring says of K = 1, checked on a small deterministic case: it is logistic
regression at the grid's smallest C (not the prototype classifier), and the prototype classifier (highest
cosine to each class's one shot) is the C -> 0 limit of that regression."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.evaluation.probe import C_GRID, _fit, few_shot_indices, few_shot_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """6 classes, E = 32, unit-norm: the set the review measured (1-shot 0.68, prototype 0.745)."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(6, 32))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 6, n)
        x = mu[y] + 1.5 * rng.normal(size=(n, 32))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    return (*make(300), *make(200))


def test_one_shot_is_logistic_regression_at_the_smallest_c_and_the_prototype_is_its_limit():
    trx, tr_y, tex, te_y = _toy()
    r = few_shot_probe(trx, tr_y, tex, te_y, 1)
    assert r["few_shot_c"] == min(C_GRID) and r["few_shot_val_top1"] is None
    idx = few_shot_indices(tr_y, 1, np.unique(np.concatenate([tr_y, te_y])), seed=0)
    at_smallest = _fit(trx[idx], tr_y[idx], min(C_GRID), 0).predict(tex)
    assert r["few_shot_top1"] == round(float((at_smallest == te_y).mean()), 6)
    prototype = tr_y[idx][(tex @ trx[idx].T).argmax(axis=1)]
    near_limit = _fit(trx[idx], tr_y[idx], 1e-4, 0).predict(tex)
    assert (near_limit == prototype).all()  # C -> 0: the prototype classifier
    assert (at_smallest != prototype).any()  # the grid's smallest C is not that limit here
    assert (r["few_shot_top1"], round(float((prototype == te_y).mean()), 6)) == (0.68, 0.745)
