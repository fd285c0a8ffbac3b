"""Dropout randomness under tensor parallelism.

Two streams, as in Megatron-LM:

* the default generator, seeded with `train.seed` on every rank: dropout on activations that are
  replicated across the TP ranks (after a row-parallel layer) must draw the SAME mask on every TP rank,
  or the replicas drift apart;
* a per-TP-rank stream (seed + 2718 + tp_rank) for dropout on activations that are split across TP ranks
  (attention probabilities of this rank's heads): each rank must draw DIFFERENT masks, or every head
  group would see the same pattern.

On CUDA the per-rank stream is megatron-core's RNG tracker (`model_parallel_cuda_manual_seed` /
`get_cuda_rng_tracker().fork()`); that tracker only knows CUDA generators, so on CPU an equivalent
state is kept here and swapped into the CPU generator. `checkpoint_contexts` lets activation
checkpointing replay the per-rank stream exactly (torch's checkpoint restores only the default one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

TP_SEED_OFFSET = 2718  # megatron's offset, so CPU and CUDA runs seed the per-rank stream alike
_CPU: dict[str, Any] = {"state": None}


def _use_cuda() -> bool:
    return torch.cuda.is_available()


def seed_tensor_parallel_rng(seed: int, tp_rank: int) -> None:
    """Create the per-TP-rank dropout stream (call after the process groups exist)."""
    if _use_cuda():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)
    gen = torch.Generator().manual_seed(seed + TP_SEED_OFFSET + tp_rank)
    _CPU["state"] = gen.get_state()


def is_seeded() -> bool:
    return _CPU["state"] is not None


@contextlib.contextmanager
def tensor_parallel_rng() -> Iterator[None]:
    """Run the body on the per-TP-rank stream; the default stream is untouched by it. Without a seeded
    stream (tp = 1, unit tests) the body runs on the default stream."""
    if not is_seeded():
        yield
        return
    if _use_cuda():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            yield
        return
    saved = torch.get_rng_state()
    torch.set_rng_state(_CPU["state"])
    try:
        yield
    finally:
        _CPU["state"] = torch.get_rng_state()
        torch.set_rng_state(saved)


def get_states() -> dict[str, Any]:
    """Snapshot of the per-rank stream(s) (tensors are replaced, never mutated, so no copy is needed)."""
    states: dict[str, Any] = {"cpu": _CPU["state"]}
    if _use_cuda() and is_seeded():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        states["cuda"] = get_cuda_rng_tracker().get_states()
    return states


def set_states(states: dict[str, Any]) -> None:
    _CPU["state"] = states["cpu"]
    if "cuda" in states:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(dict(states["cuda"]))


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: remember the per-rank stream at the original forward and
    replay it during recomputation, leaving the stream where the original forward left it."""
    saved: dict[str, Any] = {}

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        saved.update(get_states())
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after = get_states()
        set_states(saved)
        try:
            yield
        finally:
            set_states(after)

    return forward(), recompute()


def reset() -> None:
    """Drop the per-rank stream (tests)."""
    _CPU["state"] = None
