"""Tensor-parallel model on 2 gloo ranks vs the single-device model: identical initial weights from the same
seed, the same losses and (gathered) gradients; the MLM loss normalised over the global batch under DP;
the per-TP-rank dropout stream and its replay under activation checkpointing.

Why the comparisons hold: the model is built and initialised as the single-device model and
`pretrain.parallelize` cuts every split weight from that full tensor; megatron's column/row layers compute
the same sums in a different order (hence tolerances, not equality, after the first matmul), and gradients
of split weights are the slices of the full gradients while replicated ones are identical on every TP rank.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_tp_model.py.
"""

from __future__ import annotations

import pytest
import torch

from parallel import rng
from pretrain.models.transformer import Transformer

B, S, P, L, V = 8, 16, 4, 8, 60


# ------------------------------------------------------------------------------------ dropout RNG
@pytest.fixture
def fresh_rng():
    rng.reset()
    yield
    rng.reset()


# CPU always; CUDA (megatron's own RNG tracker) where a GPU is present
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_per_tp_rank_stream_differs_by_rank_and_leaves_default_stream_alone(fresh_rng, device):
    draws, after = [], []
    for tp_rank in (0, 1):
        torch.manual_seed(5)
        rng.seed_tensor_parallel_rng(5, tp_rank)
        with rng.tensor_parallel_rng():
            draws.append(torch.rand(8, device=device))
        after.append(torch.rand(8, device=device))
    torch.manual_seed(5)
    plain = torch.rand(8, device=device)
    assert not torch.equal(draws[0], draws[1])  # each TP rank its own masks for its own heads
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], plain)  # replicated dropout agrees
    assert not torch.equal(draws[0], plain)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_replays_the_tp_dropout_stream(fresh_rng, device):
    """torch's checkpoint restores only the default generator; the context_fn restores the per-rank one,
    so the recomputed attention-dropout masks equal the original ones and gradients are exact."""
    grads, outs = [], []
    for tp_rank, ckpt in ((1, False), (1, True), (0, False)):
        torch.manual_seed(0)
        rng.seed_tensor_parallel_rng(0, tp_rank)
        net = Transformer(16, 2, 4, attn_dropout=0.5).to(device).train()
        net.grad_checkpointing = ckpt
        x = torch.randn(2, 5, 16, device=device, requires_grad=True)
        y = net(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])  # the other TP rank drew other attention masks
