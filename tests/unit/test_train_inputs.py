"""What the training loop hands the model: the MAE patch noise stays fp32 under bf16/fp16, so the same seed
masks the same patches in every precision."""

from __future__ import annotations

import pytest
import torch

from pretrain.models.vision import random_masking
from pretrain.train import move_batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("patches", [64, 196])
def test_masks_are_identical_in_every_precision(dtype, patches):
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(256, 3, 4, 4, generator=gen),
             "patch_noise": torch.rand(256, patches, generator=gen)}  # what the data pipeline draws (fp32)
    tokens = torch.zeros(256, patches, 1)
    _, ref_mask, ref_restore = random_masking(tokens, batch["patch_noise"], 0.5)
    moved = move_batch(batch, torch.device("cpu"), dtype)
    assert moved["image"].dtype == dtype and moved["patch_noise"].dtype == torch.float32
    _, mask, restore = random_masking(tokens, moved["patch_noise"], 0.5)
    assert torch.equal(mask, ref_mask) and torch.equal(restore, ref_restore)


def test_low_precision_noise_would_change_the_masks():
    """Why: noise rounded to bf16 ties at the keep threshold in a large share of samples."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(256, 196, generator=gen)
    tokens = torch.zeros(256, 196, 1)
    _, ref_mask, _ = random_masking(tokens, noise, 0.5)
    _, bf16_mask, _ = random_masking(tokens, noise.bfloat16(), 0.5)
    differing = (bf16_mask != ref_mask).any(dim=1).float().mean().item()
    assert differing > 0.05, differing
