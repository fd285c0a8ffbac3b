"""Synthetic model batches for tests that drive `PretrainModel` directly (no data pipeline): captions
with BOS/EOS/PAD at varying positions, MLM masks, images and MAE patch noise from one generator."""

from __future__ import annotations

import torch

PAD, BOS, MASK, EOS = 0, 1, 2, 3
VOCAB = 100


def captions(gen: torch.Generator, b: int, length: int, vocab: int = VOCAB) -> torch.Tensor:
    """[b, length]: BOS, words, EOS at varying positions, PAD after it (row 0 has no padding)."""
    ids = torch.randint(4, vocab, (b, length), generator=gen)
    ids[:, 0] = BOS
    for r in range(b):
        eos = length - 1 - (r * 3) % (length - 2)
        ids[r, eos] = EOS
        ids[r, eos + 1:] = PAD
    return ids


def make_batch(gen: torch.Generator, b: int, image: int, patches: int, length: int
               ) -> dict[str, torch.Tensor]:
    ids = captions(gen, b, length)
    pick = (torch.rand(b, length, generator=gen) < 0.3) & (ids != PAD)
    labels = torch.where(pick, ids, -100)
    return {"image": torch.randn(b, 3, image, image, generator=gen), "text": ids,
            "mlm_input": torch.where(pick, MASK, ids), "mlm_labels": labels,
            "patch_noise": torch.rand(b, patches, generator=gen)}
