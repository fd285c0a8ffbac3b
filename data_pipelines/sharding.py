"""Which shards a given rank and DataLoader worker read in a given epoch."""

from __future__ import annotations

import numpy as np


def epoch_shards(
    shards: list[str],
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    """Shards of (rank, worker) in `epoch`: optional seeded shuffle, then `[rank::world][worker::W]`.

    Every process computes the same permutation from (seed, epoch), so the per-epoch partition is disjoint
    and complete across ranks and workers without any communication.
    """
    order = list(shards)
    if shuffle:
        perm = np.random.default_rng([seed & ((1 << 64) - 1), epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order[rank::world][worker::num_workers]


def check_enough_shards(num_shards: int, world: int, workers: int) -> None:
    """Every worker of every rank needs at least one shard each epoch, or it would have nothing to read."""
    streams = max(workers, 1)
    if num_shards < world * streams:
        raise ValueError(
            f"{num_shards} shards cannot feed {world} ranks x {streams} workers: each DataLoader worker of "
            f"each rank needs at least one shard per epoch (need >= {world * streams}); write more, smaller "
            f"shards or lower data.workers")
