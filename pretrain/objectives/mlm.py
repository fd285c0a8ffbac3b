"""BERT's masked-language loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], labels [B, L] (IGNORE_INDEX = not predicted) -> fp32 mean cross-entropy over the
    predicted tokens. A batch with none selected gives 0 that still has a graph, so backward and
    ZeRO's gradient hooks run the same on every rank."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)
