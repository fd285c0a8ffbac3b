"""Synthetic model batches for tests that drive `PretrainModel` directly (no data pipeline): captions
with BOS/EOS/PAD at varying positions, MLM masks, images and MAE patch noise from one generator."""

from __future__ import annotations

import torch

PAD, BOS, MASK, EOS = 0, 1, 2, 3
VOCAB = 100

# The shapes of tests/tiny.py's MICRO model (ZeRO-3, persistence 0 so every parameter is partitioned).
ENGINE_BASE = [
    "model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=2",
    "model.vision.heads=2", "model.text.width=32", "model.text.layers=2", "model.text.heads=2",
    "model.text.context_length=12", "model.embed_dim=16", "model.decoder.width=16", "model.decoder.layers=1",
    "model.decoder.heads=2", "model.vocab_pad_multiple=64", "train.micro_batch=4", "train.precision=fp32",
    "optim.warmup_steps=1", "optim.lr=2e-3", "optim.schedule=constant", "parallel.zero_stage=3",
    "parallel.persistence_threshold=0", "train.grad_clip=1.0",
]
FP16_START = 10
"""`train.fp16_initial_scale_power` of the fp16 engine runs (DeepSpeed's default is 16). This model's
gradients reach ~21 at initialisation (text embeddings), so any scale above ~2^11 overflows fp16 and ZeRO
skips the step: from 2^16 the first five steps are skipped and fp16 could not be compared with fp32 step by
step."""


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
