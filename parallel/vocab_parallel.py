"""Cross-entropy over a vocabulary whose logits may be split across tensor-parallel ranks.

Lives in `parallel/` (not in the model) because the losses in `pretrain/objectives` use it
and must not import the model package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.groups import tp_size


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of `logits` [..., V_local] against `labels` [...], skipping
    `ignore_index`. With tp > 1 the logits are this rank's vocabulary slice (the MLM head's
    `vocab_linear`) and megatron-core's vocab-parallel cross-entropy reduces the softmax over TP ranks
    without ever gathering the full vocabulary; the result is the same on every TP rank."""
    if tp_size() == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                               reduction="sum")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    keep = labels != ignore_index
    # megatron subtracts the max in place: the clone keeps that away from the layer's output
    per_token = vocab_parallel_cross_entropy(logits.float().clone(), labels.where(keep, 0))
    return (per_token * keep).sum()
