"""Do the image tokens the fusion encoder reads say which colour and which shape sit where? (#20's diagnosis)

    python scripts/probe_image_tokens.py RUN_DIR [--train 3000] [--test 600]

Linear probes (scikit-learn logistic regression) on the contrastive pass's output tokens (`ln_post`, what
`PretrainModel.image_tokens` hands the fusion encoder) of a trained checkpoint, over two-object compositional
samples drawn fresh (train seed 1000, held-out seed 2000): the left and the right object's colour and shape,
from the CLS token alone and from all patch tokens (flattened, so the probe knows each token's place). The
colour swap needs colour bound to shape, the object swap colour and shape bound to a side: if the patch tokens
decode all four, a fusion encoder that fails the binding probe is failing to use what its input holds, not
missing it. `text_*`: the same for the caption's states (which colour the caption puts on which side). Prints
one JSON object (chance: one over the colours, one over the shapes).
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipelines.synth import COLOURS, SHAPES, make_pair_sample
from data_pipelines.transforms import normalize_batch


def _features(model: Any, cfg: Any, n: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(CLS [n, W], patch tokens flattened [n, N*W], labels: left/right colour and shape, each [n]) of n fresh
    samples."""
    colours, shapes = list(COLOURS), list(SHAPES)
    images, labels = [], {k: [] for k in ("left_colour", "right_colour", "left_shape", "right_shape")}
    for i in range(n):
        s = make_pair_sample(i, cfg.model.image_size, seed)
        images.append(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")))
        objects = json.loads(s["json"])["objects"]
        for side, obj in zip(("left", "right"), objects):
            labels[f"{side}_colour"].append(colours.index(obj["colour"]))
            labels[f"{side}_shape"].append(shapes.index(obj["shape"]))
    x = normalize_batch(images, tuple(cfg.data.mean), tuple(cfg.data.std))
    with torch.no_grad():
        tokens = model.image_tokens(x).float()  # [n, 1 + N, W]
    return tokens[:, 0].numpy(), tokens[:, 1:].flatten(1).numpy(), {k: np.array(v) for k, v in labels.items()}


def probe(model: Any, cfg: Any, n_train: int = 3000, n_test: int = 600) -> dict[str, float]:
    """Held-out accuracy of each probe, plus chance (one over the number of colours, of shapes)."""
    from sklearn.linear_model import LogisticRegression

    train, test = _features(model, cfg, n_train, 1000), _features(model, cfg, n_test, 2000)
    out = {"chance": 1 / len(COLOURS), "chance_shape": 1 / len(SHAPES)}
    for name, k in (("cls", 0), ("patches", 1)):
        for label in train[2]:
            clf = LogisticRegression(max_iter=2000).fit(train[k], train[2][label])
            out[f"{name}_{label}"] = round(float(clf.score(test[k], test[2][label])), 4)
    # is a patch's side in its own content? The cross-attention pools tokens by content, so "which colour is
    # left" reaches the fusion encoder only if each token says where it is (the probe above is told)
    grid = cfg.model.image_size // cfg.model.vision.patch_size
    side = (np.arange(grid * grid) % grid < grid // 2).astype(int)  # [N]: 1 = left half

    def tokens(feats: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        t = feats[:n].reshape(n * grid * grid, -1)  # [n N, W]
        return t, np.tile(side, n)

    x, y = tokens(train[1], min(n_train, 500))
    xt, yt = tokens(test[1], min(n_test, 200))
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    out["patch_side_from_content"] = round(float(clf.score(xt, yt)), 4)
    return out


def text_probe(model: Any, tokenizer: Any, cfg: Any, n_train: int = 3000, n_test: int = 600
               ) -> dict[str, float]:
    """The text side of the same question: do the caption's causal-pass states (the fusion encoder's text
    input) say which colour the caption puts on the left and on the right? Its EOS state (what the match
    head's position sees before fusion) and all its token states flattened; labels from the sample's objects
    (the caption says "A left of B" or "B right of A", so the answer needs the word order)."""
    from sklearn.linear_model import LogisticRegression

    def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        colours = list(COLOURS)
        captions, labels = [], {"left_colour": [], "right_colour": []}
        for i in range(n):
            s = make_pair_sample(i, cfg.model.image_size, seed)
            captions.append(s["txt"].decode())
            for side, obj in zip(("left", "right"), json.loads(s["json"])["objects"]):
                labels[f"{side}_colour"].append(colours.index(obj["colour"]))
        ids = tokenizer.encode_batch(captions, cfg.model.text.context_length)
        with torch.no_grad():
            states = model.text_tokens(ids).float()  # [n, L, W]
        eos = states[torch.arange(n), model.text.pool_positions(ids)]  # [n, W]
        return eos.numpy(), states.flatten(1).numpy(), {k: np.array(v) for k, v in labels.items()}

    train, test = features(n_train, 1000), features(n_test, 2000)
    out: dict[str, float] = {}
    for name, k in (("text_eos", 0), ("text_tokens", 1)):
        for label in train[2]:
            clf = LogisticRegression(max_iter=2000).fit(train[k], train[2][label])
            out[f"{name}_{label}"] = round(float(clf.score(test[k], test[2][label])), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run directory or any checkpoint `pretrain eval` reads")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=600)
    args = p.parse_args()
    from pretrain.evaluation.evaluate import load_model

    model, tokenizer, cfg = load_model(args.run_dir)
    out = probe(model, cfg, args.train, args.test)
    out.update(text_probe(model, tokenizer, cfg, args.train, args.test))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
