"""Linear probe: logistic regression on frozen, L2-normalised image features (CLIP's protocol).

    pretrain eval --checkpoint RUN --data VAL_SHARDS --classnames classnames.txt --linear-probe TRAIN_SHARDS

Features are the model's own `encode_image` (every patch seen, eval centre crop, no augmentation) of the
labelled (`.cls` >= 0) samples. The L2 regularisation strength is chosen as in CLIP: a sweep of the inverse
strength C, each fitted on one part of the train features and scored on a held-out part (a stratified
split, seeded); the best C is then refitted on all train features and scored once on the eval shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipelines.loader import make_eval_loader

C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)
"""Inverse L2 strengths swept on the held-out part of the train features (unit-norm
features need large C; CLIP searched 1e-6 to 1e6)."""


@torch.no_grad()
def labelled_image_features(model: Any, tokenizer: Any, cfg: Any, urls: str, batch_size: int = 128,
                            max_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([N, E] fp32 normalised image embeddings, [N] int labels) of the samples of `urls` that carry a
    `.cls` label, in eval-loader order; at most `max_samples` (0: all)."""
    device = next(model.parameters()).device
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size,
                              cfg.model.text.context_length, cfg.data.mean, cfg.data.std, workers=0,
                              max_sample_bytes=cfg.data.max_sample_bytes)
    feats, labels, n = [], [], 0
    for batch in loader:
        keep = batch["cls"] >= 0
        if keep.any():
            feats.append(model.encode_image(batch["image"][keep].float().to(device)).cpu())
            labels.append(batch["cls"][keep])
            n += int(keep.sum())
        if max_samples and n >= max_samples:
            break
    if not feats:
        raise ValueError(f"--linear-probe: no labelled (.cls) samples in {urls}")
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)
    return (x[:max_samples], y[:max_samples]) if max_samples else (x, y)


def _split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/held-out indices: each class puts ~`val_fraction` of its samples (at least one,
    when it has two or more) in the held-out part."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        k = max(k, 1) if len(idx) > 1 else 0
        held.extend(idx[:k])
        fit.extend(idx[k:])
    return np.sort(np.array(fit, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # one BLAS/OpenMP thread: beside torch's own thread pools (and on a shared CPU) the solver's threads
    # fought over the cores and one fit took 50x longer (51 s vs 0.8 s measured, 3277 x 128 features)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # weak regularisation may stop at max_iter
        # few-shot fits have as many classes as a few samples each: that is the task, not a regression
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c_grid: tuple[float, ...] = C_GRID, val_fraction: float = 0.2, seed: int = 0
                 ) -> dict[str, Any]:
    """Choose C on a held-out split of the train features, refit on all of them, score top-1 on the test
    features. Returns `linear_probe_top1`, `linear_probe_c`, `linear_probe_val_top1` (the held-out score
    of the chosen C) and the sample counts."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("--linear-probe: the train features need at least two classes")
    fit_idx, held_idx = _split(train_y, val_fraction, seed)
    scores = {}
    if len(held_idx) and len(np.unique(train_y[fit_idx])) >= 2:
        for c in c_grid:
            clf = _fit(train_x[fit_idx], train_y[fit_idx], c, seed)
            scores[c] = float((clf.predict(train_x[held_idx]) == train_y[held_idx]).mean())
        best = max(c_grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    else:
        best = 1.0
    clf = _fit(train_x, train_y, best, seed)
    return {"linear_probe_top1": round(float((clf.predict(test_x) == test_y).mean()), 6),
            "linear_probe_c": best,
            "linear_probe_val_top1": round(scores[best], 6) if best in scores else None,
            "linear_probe_train_samples": int(len(train_y)), "linear_probe_test_samples": int(len(test_y))}


def few_shot_indices(train_y: np.ndarray, k: int, classes: np.ndarray, classnames: list[str] | None = None,
                     seed: int = 0) -> np.ndarray:
    """Indices of `k` train samples of each of `classes`, drawn without replacement by a seeded RNG (the
    same draw for every checkpoint evaluated on the same features order). A ValueError names every class
    with fewer than `k` samples."""
    if k < 1:
        raise ValueError(f"--few-shot: K must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    short, picked = [], []
    for c in classes:
        idx = np.flatnonzero(train_y == c)
        if len(idx) < k:
            name = classnames[c] if classnames is not None and 0 <= c < len(classnames) else f"class {c}"
            short.append(f"{name!r} ({len(idx)})")
            continue
        picked.append(np.sort(rng.choice(idx, size=k, replace=False)))
    if short:
        raise ValueError(f"--few-shot {k}: these classes have fewer than {k} labelled train samples: "
                         f"{', '.join(short)}")
    return np.concatenate(picked)


def few_shot_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int,
                   classnames: list[str] | None = None, c_grid: tuple[float, ...] = C_GRID, seed: int = 0
                   ) -> dict[str, Any]:
    """Logistic regression on `k` train samples per class (every class of the train or test labels),
    scored top-1 on the test features: `few_shot_top1`, `few_shot_k`, `few_shot_c`, `few_shot_val_top1`.

    C is chosen by leave-one-shot-out cross-validation when k >= 2: fold i holds out the i-th drawn sample
    of every class and fits on the other k-1 per class, each fold scored for every C of `c_grid`; the best
    mean (ties: the stronger regularisation) is refitted on all k per class. A 20% split as in the full
    probe would leave most classes with no held-out or no fitting sample at tiny k. With k = 1 nothing can
    be held out, so C is fixed at the grid's smallest (the strongest regularisation it holds; a large C
    would fit one sample per class without bound) and `few_shot_val_top1` is None. That is logistic
    regression at that C, not the nearest class-mean (prototype) classifier: the prototype one is only the
    C -> 0 limit (the multinomial solution tends to w_c ∝ x_c - mean(x), decisions to the highest cosine to
    each class's one shot), and on unit-norm features the grid's smallest C is not near that limit. Its
    1-shot top-1 was measured from a few points below the prototype's (0.68 vs 0.745, 6 classes, E = 32)
    to within 0.3 points of it (32 classes, E = 128): compare 1-shot numbers with each other, not with a
    prototype baseline."""
    classes = np.unique(np.concatenate([train_y, test_y]))
    idx = few_shot_indices(train_y, k, classes, classnames, seed)
    x, y = train_x[idx], train_y[idx]
    if len(classes) < 2:
        raise ValueError("--few-shot: the train features need at least two classes")
    scores: dict[float, float] = {}
    if k >= 2:
        fold = np.concatenate([np.arange(k)] * len(classes))  # idx is grouped by class, k each
        for c in c_grid:
            hits = 0
            for f in range(k):
                clf = _fit(x[fold != f], y[fold != f], c, seed)
                hits += int((clf.predict(x[fold == f]) == y[fold == f]).sum())
            scores[c] = hits / len(y)
        best = max(c_grid, key=lambda c: (scores[c], -c))
    else:
        best = min(c_grid)
    clf = _fit(x, y, best, seed)
    return {"few_shot_top1": round(float((clf.predict(test_x) == test_y).mean()), 6), "few_shot_k": int(k),
            "few_shot_c": best, "few_shot_val_top1": round(scores[best], 6) if scores else None,
            "few_shot_train_samples": int(len(y))}
