"""Batch assembly inside the DataLoader worker: stacking, per-batch tokenization, MLM and MAE noise.

Collating in the worker (the DataLoader runs with batch_size=None) means the main training process only
receives ready tensors, and tokenization runs once per batch through the fast tokenizer's batch encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .clip_tokenizer import ClipTokenizer
from .masking import mlm_mask
from .tokenizer import TextTokenizer
from .transforms import normalize_batch


@dataclass
class TrainExample:
    """One decoded training sample (uint8 [H, W, 3]) plus the generators that fix its MLM mask and patch
    noise, and the epoch it belongs to (for the key audit)."""

    key: str
    image: np.ndarray
    caption: str
    cls: int
    mlm_rng: np.random.Generator
    noise_rng: np.random.Generator
    epoch: int = 0
    negative: str = ""  # a caption that does not match (`neg.txt`), "" when the sample has none
    more_negatives: tuple[str, ...] = ()  # this step's further `neg.txt` lines (caption_negatives_per_step)


@dataclass
class EvalExample:
    key: str
    image: np.ndarray
    caption: str
    cls: int


def collate_train(
    examples: list[TrainExample],
    tokenizer: TextTokenizer | ClipTokenizer,
    context_length: int,
    mask_prob: float,
    num_patches: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    skew_phrase: str = "",
) -> dict[str, Any]:
    """Model inputs for a training batch (the keys and dtypes are the contract with the model code).
    `itm_skew` [B] bool (caption contains `skew_phrase`, `objectives.itm.skew_phrase`) only when it is given.
    `neg_text` [B, L] / `has_negative` [B] only when some sample carries a negative caption, and
    `neg_text_more` [B, K - 1, L] when samples carry K per step (`objectives.itm.caption_negatives_per_step`;
    rows of samples without any hold their own caption, which `has_negative` marks unused)."""
    text = tokenizer.encode_batch([e.caption for e in examples], context_length)
    ids = text.numpy()
    vocab, specials = tokenizer.vocab_size, tokenizer.special_ids
    mlm_input = np.empty_like(ids)
    mlm_labels = np.empty_like(ids)
    # caption tokens lie before the end token (CLIP's padding id 0 is also a real token, "!")
    content = np.arange(ids.shape[1])[None, :] < (ids == tokenizer.eos_id).argmax(axis=1)[:, None]
    for i, ex in enumerate(examples):
        mlm_input[i], mlm_labels[i] = mlm_mask(ids[i], ex.mlm_rng, mask_prob, vocab, specials,
                                               mask_id=tokenizer.mask_id, content=content[i])
    noise = np.stack([ex.noise_rng.random(num_patches, dtype=np.float32) for ex in examples])
    # drawn after the patch noise, so patch_noise is what it was before this key existed
    itm_noise = np.stack([ex.noise_rng.random(2, dtype=np.float32) for ex in examples])
    extra: dict[str, Any] = {}
    if any(ex.negative for ex in examples):  # data-supplied negative captions (`neg.txt`), where present
        extra["neg_text"] = tokenizer.encode_batch([ex.negative or ex.caption for ex in examples],
                                                   context_length)
        extra["has_negative"] = torch.tensor([bool(ex.negative) for ex in examples])
    more = max((len(ex.more_negatives) for ex in examples), default=0)
    if more:
        rows = [c for ex in examples for c in (list(ex.more_negatives) + [ex.caption] * more)[:more]]
        extra["neg_text_more"] = tokenizer.encode_batch(rows, context_length).view(len(examples), more, -1)
    if skew_phrase:
        extra["itm_skew"] = torch.tensor([skew_phrase in ex.caption for ex in examples])
    return {**extra,
        "image": normalize_batch([ex.image for ex in examples], mean, std),
        "text": text,
        "mlm_input": torch.from_numpy(mlm_input),
        "mlm_labels": torch.from_numpy(mlm_labels),
        "patch_noise": torch.from_numpy(noise),
        # two uniforms per sample for the image-text matching negatives' draws (pretrain/objectives/itm.py)
        "itm_noise": torch.from_numpy(itm_noise),
        "cls": torch.tensor([ex.cls for ex in examples], dtype=torch.long),
        "_keys": [ex.key for ex in examples],
        "_epochs": [ex.epoch for ex in examples],
    }


def collate_eval(
    examples: list[EvalExample], tokenizer: TextTokenizer, context_length: int, mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    """Inputs for zero-shot / retrieval evaluation: no masking, no noise."""
    return {
        "image": normalize_batch([ex.image for ex in examples], mean, std),
        "text": tokenizer.encode_batch([ex.caption for ex in examples], context_length),
        "cls": torch.tensor([ex.cls for ex in examples], dtype=torch.long),
        "_keys": [ex.key for ex in examples],
    }


def collate_empty(context_length: int, image_size: int, num_patches: int | None = None) -> dict[str, Any]:
    """A batch of no rows with a real eval batch's keys and trailing shapes (with `num_patches`: a masked
    one's, `collate_train`'s keys), and `_order`: how an eval stream that read no usable sample still hands
    its skip counts to the consumer."""
    text = torch.zeros(0, context_length, dtype=torch.long)
    batch: dict[str, Any] = {"image": torch.zeros(0, 3, image_size, image_size), "text": text,
                             "cls": torch.zeros(0, dtype=torch.long), "_keys": []}
    if num_patches is not None:
        batch.update(mlm_input=text.clone(), mlm_labels=text.clone(), patch_noise=torch.zeros(0, num_patches),
                     itm_noise=torch.zeros(0, 2), _epochs=[])
    batch["_order"] = torch.zeros(0, 2, dtype=torch.long)
    return batch
