"""Differential privacy of what leaves a site: clip the site's whole pseudo-gradient, add Gaussian noise,
and account for it with opacus's RDP accountant (a maintained implementation, not a formula of ours).

The unit protected is the *site*: one round's release is the site's clipped pseudo-gradient plus
N(0, (noise x clip)^2) per value, a Gaussian mechanism of sensitivity `clip` under add/remove of the site's
whole contribution (DP-FedAvg's user-level relation), with sampling rate 1 (every site takes part in every
round). That is the epsilon reported. An observer who compares two arbitrary datasets of one site (replace
instead of remove) faces sensitivity 2 x clip: the same epsilon then needs twice the noise. Not given:
sample-level privacy of one image-caption pair inside a site (per-sample clipping in the inner steps,
DP-SGD) and protection against the site's own operators. See docs/cross_site.md.

The noise generator is seeded by (site, round, rank): distinct draws on every rank's partition and in
every round, reproducible for a given run, independent between sites.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import torch


def clip_scale(site_sq_norm: float, clip: float) -> float:
    """Factor that brings a pseudo-gradient of squared L2 norm `site_sq_norm` (summed over every rank of
    the site) to norm <= `clip`; 1 when it already is, or when clipping is off (clip = 0)."""
    if clip <= 0:
        return 1.0
    norm = math.sqrt(max(site_sq_norm, 0.0))
    return 1.0 if norm <= clip else clip / norm


def noise_seed(site: str, round_index: int, rank: int) -> int:
    """A 63-bit seed for the noise of `site`'s partition on `rank` in `round_index`."""
    digest = hashlib.sha256(f"mmpt-cross-site/{site}/{round_index}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian_noise(like: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) of `like`'s shape, drawn on the CPU from `seed` (the same draws on any device)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(like.shape, generator=gen, dtype=torch.float32) * std).to(like.device)


class PrivacyLedger:
    """Epsilon of the rounds released so far at `delta`, from opacus's RDP accountant (one Gaussian
    mechanism per round, noise multiplier `noise`, sampling rate 1). `rounds` is checkpointed."""

    def __init__(self, noise: float, delta: float, rounds: int = 0) -> None:
        self.noise, self.delta, self.rounds = noise, delta, rounds

    @property
    def enabled(self) -> bool:
        return self.noise > 0

    def _epsilon(self, rounds: int) -> float:
        from opacus.accountants import RDPAccountant

        if not rounds:
            return 0.0
        acc = RDPAccountant()
        acc.history = [(self.noise, 1.0, rounds)]
        with warnings.catch_warnings():  # "optimal order is the smallest alpha": loose, not wrong
            warnings.simplefilter("ignore", UserWarning)
            return float(acc.get_epsilon(delta=self.delta))

    def record_round(self) -> tuple[float, float]:
        """Count one more released round; return (epsilon of one round, epsilon of all rounds so far)."""
        self.rounds += 1
        return self._epsilon(1), self._epsilon(self.rounds)

    def total(self) -> float:
        return self._epsilon(self.rounds)
