"""BERT's masked-language loss."""

from __future__ import annotations

import torch

from parallel.collectives import global_batch_mean
from parallel.vocab_parallel import cross_entropy_sum

IGNORE_INDEX = -100


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """logits [B, L, V] (under tensor parallelism this rank's vocabulary slice [B, L, V/tp]), labels
    [B, L] (IGNORE_INDEX = not predicted) -> fp32 mean cross-entropy over the predicted tokens.

    Data parallel (`group` = the DP group, distributed): the mean is over the predicted tokens of the
    GLOBAL batch. Each rank returns its token sum x dp / global count, so the mean over DP ranks (what is
    logged, and what DeepSpeed's gradient averaging differentiates) is exactly the single-process loss of
    the same global batch, however unevenly the masked tokens fall between ranks. The count is
    all-reduced without gradient: it is a constant of the batch.

    A batch with none selected gives 0 that still has a graph, so backward and ZeRO's gradient hooks run
    the same on every rank."""
    total = cross_entropy_sum(logits, labels, IGNORE_INDEX)
    return global_batch_mean(total, (labels != IGNORE_INDEX).sum(), group)
