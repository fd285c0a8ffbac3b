"""Seeds derived from stable hashes, so randomness never depends on process layout or PYTHONHASHSEED.

Per-sample randomness is keyed by (seed, epoch, sample key) rather than by a worker's RNG, so the crop and
masks a sample gets are the same whichever rank or DataLoader worker happens to read it, and a resumed or
re-sharded run reproduces them exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

_U64 = (1 << 64) - 1


def stable_hash(text: str) -> int:
    """A 63-bit hash of `text` that is identical in every process and Python run (unlike `hash`)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def derive_seed(*parts: int) -> int:
    """One 64-bit seed from several integers (negative ones wrap), for RNGs that take a single int."""
    words = np.random.SeedSequence([p & _U64 for p in parts]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def sample_rngs(seed: int, epoch: int, key: str, n: int = 3) -> list[np.random.Generator]:
    """Independent generators for one sample in one epoch (crop, MLM mask, patch noise).

    Separate streams mean that changing, say, the MLM mask probability does not change the crops.
    """
    root = np.random.SeedSequence([seed & _U64, epoch & _U64, stable_hash(key)])
    return [np.random.default_rng(child) for child in root.spawn(n)]
