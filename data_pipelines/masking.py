"""BERT-style masked-language-model corruption of one tokenized caption."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100
"""Label value the MLM loss ignores (PyTorch cross-entropy's default)."""

MASK_ID = 4


def mlm_mask(
    ids: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float,
    vocab_size: int,
    special_ids: Iterable[int],
    mask_id: int = MASK_ID,
    content: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Select ~mask_prob of the non-special tokens; of those 80% -> [MASK], 10% -> random token, 10% kept.

    At least one token is selected whenever any is maskable, so short captions still give the MLM loss a
    target. Random replacements are drawn from non-special ids only (a random [PAD] or [EOS] would teach the
    model something false about sequence structure). Returns (input_ids, labels) as int64, with labels the
    original id at selected positions and -100 elsewhere. `content` (bool, like `ids`) further limits
    the selectable positions: with CLIP's tokenizer padding is id 0, also a real token, so the caller
    passes the positions before the end-of-text token.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    ids = np.asarray(ids, dtype=np.int64)
    specials = np.unique(np.asarray(list(special_ids), dtype=np.int64))
    specials_in_vocab = specials[(specials >= 0) & (specials < vocab_size)]
    if vocab_size - len(specials_in_vocab) <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special token to sample")
    maskable = ~np.isin(ids, specials)
    if content is not None:
        maskable &= np.asarray(content, dtype=bool)
    selected = (rng.random(ids.shape[0]) < mask_prob) & maskable
    if not selected.any() and maskable.any():
        selected[rng.choice(np.flatnonzero(maskable))] = True
    labels = np.where(selected, ids, IGNORE_INDEX)
    inputs = ids.copy()
    action = rng.random(ids.shape[0])
    inputs[selected & (action < 0.8)] = mask_id
    randomise = selected & (action >= 0.8) & (action < 0.9)
    n_random = int(randomise.sum())
    if n_random:
        # uniform over [0, vocab) minus the special ids: sample in the smaller range and step over specials
        draw = rng.integers(0, vocab_size - len(specials_in_vocab), size=n_random)
        for special in specials_in_vocab:
            draw[draw >= special] += 1
        inputs[randomise] = draw
    return inputs, labels
