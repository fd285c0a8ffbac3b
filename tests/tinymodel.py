"""A tiny `PretrainModel` configuration and a fixed batch for it, for the unit tests that drive the model
and its losses directly (objectives, chunked losses, FLOPs)."""

from __future__ import annotations

import torch

from pretrain.config import DecoderConfig, ModelConfig, ObjectivesConfig, TextConfig, VisionConfig

PAD, BOS, MASK, EOS = 0, 1, 2, 3
B, S, P, L, V = 8, 16, 4, 8, 60
N = (S // P) ** 2


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(image_size=S, embed_dim=24, vocab_pad_multiple=64,
                       vision=VisionConfig(patch_size=P, width=32, layers=2, heads=4),
                       text=TextConfig(width=32, layers=2, heads=4, context_length=L),
                       decoder=DecoderConfig(width=16, layers=1, heads=2))


def objectives(contrastive: float = 1.0, mim: float = 1.0, mlm: float = 1.0) -> ObjectivesConfig:
    o = ObjectivesConfig()
    o.contrastive.weight, o.mim.weight, o.mlm.weight = contrastive, mim, mlm
    return o


def make_batch(seed: int = 0, b: int = B) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, L), generator=gen)
    ids[:, 0] = BOS
    for i in range(b):
        e = 3 + i % (L - 3)
        ids[i, e], ids[i, e + 1:] = EOS, PAD
    mlm_input, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_input[:, 1:3], labels[:, 1:3] = MASK, ids[:, 1:3]
    return {"image": torch.randn(b, 3, S, S, generator=gen), "text": ids, "mlm_input": mlm_input,
            "mlm_labels": labels, "patch_noise": torch.rand(b, N, generator=gen),
            "_position": torch.zeros(1), "cls": torch.zeros(b, dtype=torch.long)}
