"""Differential privacy of what leaves a site: clip the site's whole pseudo-gradient, add Gaussian noise,
and account for it with opacus's RDP accountant (a maintained implementation, not a formula of ours).

The unit protected is the *site*: one round's release is the site's clipped pseudo-gradient plus
N(0, (noise x clip)^2) per value, a Gaussian mechanism of sensitivity `clip` under add/remove of the site's
whole contribution (DP-FedAvg's user-level relation), with sampling rate 1 (every site takes part in every
round). That is the epsilon reported. An observer who compares two arbitrary datasets of one site (replace
instead of remove) faces sensitivity 2 x clip: the same epsilon then needs twice the noise. Not given:
sample-level privacy of one image-caption pair inside a site (per-sample clipping in the inner steps,
DP-SGD) and protection against the site's own operators. See docs/cross_site.md.

The noise must be unknown to everyone but the site: whoever can regenerate it can subtract it, and a
seed derived from public values (site, round, rank: all three are in the store's key of every payload)
would give the noise away to the store, the other sites and anyone reading the traffic. So every release
draws a fresh 256-bit key from the operating system's CSPRNG (`secrets`), expands it into normals with
SHAKE-256 (a cryptographic XOF: the draws do not reveal the key or each other, unlike a Mersenne Twister,
whose state a few hundred outputs recover) and forgets it. Nothing about it is stored, checkpointed or
sent, so a replayed round draws new noise too (that replay is then one more release for the accountant).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from typing import Any

import torch


def clip_scale(site_sq_norm: float, clip: float) -> float:
    """Factor that brings a pseudo-gradient of squared L2 norm `site_sq_norm` (summed over every rank of
    the site) to norm <= `clip`; 1 when it already is, or when clipping is off (clip = 0). A norm that is
    not finite is refused: NaN would pass through as a NaN factor and inf would give 0, and inf x 0 is NaN."""
    if clip <= 0:
        return 1.0
    if not math.isfinite(site_sq_norm):
        raise ValueError(f"cross_site.dp_clip: the pseudo-gradient's squared norm is {site_sq_norm}, not a "
                         "finite number: there is nothing meaningful to clip")
    norm = math.sqrt(max(site_sq_norm, 0.0))
    return 1.0 if norm <= clip else clip / norm


def noise_seed() -> bytes:
    """A fresh 256-bit secret for one release's noise, from the OS CSPRNG. The caller uses it once and keeps
    it nowhere: not in the checkpoint, the store or the log (see the module docstring)."""
    return secrets.token_bytes(32)


_NOISE_PIECE = 1 << 22
"""Normals per SHAKE-256 call: bounds the temporary memory to a few tens of MB whatever the partition."""


def gaussian_noise(like: torch.Tensor, std: float, seed: bytes) -> torch.Tensor:
    """N(0, std^2) of `like`'s shape (fp32, on its device), a deterministic function of the secret `seed`
    (so that it can be tested) and of nothing public. SHAKE-256 of (seed, piece) gives 64 bits per value; the
    top 53 of each pair make two uniforms in (0, 1], Box-Muller in float64 turns them into two normals (tails
    to 8.5 std, against 5.8 for a float32 generator)."""
    if len(seed) < 16:
        raise ValueError(f"gaussian_noise: a seed of {len(seed)} bytes is too short to be secret "
                         "(use noise_seed())")
    n = like.numel()
    out = torch.empty(n, dtype=torch.float32, device=like.device)
    for piece, start in enumerate(range(0, n, _NOISE_PIECE)):
        count = min(_NOISE_PIECE, n - start)
        pairs = -(-count // 2)
        stream = hashlib.shake_256(b"mmpt-cross-site-noise/" + seed + piece.to_bytes(8, "little"))
        words = torch.frombuffer(bytearray(stream.digest(16 * pairs)), dtype=torch.int64).to(like.device)
        # the top 53 bits as an integer in [0, 2^53), + 1: uniforms in (0, 1], so log(u) is finite
        u = ((words >> 11) & ((1 << 53) - 1)).double().add_(1.0).mul_(2.0 ** -53).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = (2.0 * math.pi) * u[1]
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        out[start:start + count] = (normals * std).float()
    return out.view(like.shape)


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


def noise_change(state: dict[str, Any], noise: float) -> str | None:
    """Why a checkpoint's outer state may not be resumed at `noise` (cross_site.dp_noise), or None. The
    accountant prices every round at one noise multiplier: rounds this site released at another one, or
    without noise, would be reported as if they had today's, and the epsilon would be too low."""
    before = state.get("dp_noise")  # absent: a checkpoint from before this was recorded
    if before is None or noise <= 0 or float(before) == noise:
        return None
    if float(before) > 0:
        released = int(state.get("dp_rounds", 0))
        what = f"at cross_site.dp_noise={float(before):g}"
    else:
        released = int(state["round"])  # without noise releases are not counted: every round may be one
        what = "without noise (cross_site.dp_noise=0), which no epsilon covers"
    if not released:
        return None
    return (f"its checkpoint released {released} rounds {what}, and cross_site.dp_noise is now {noise:g}: "
            "the reported epsilon would price those rounds at the new noise. Resume with the checkpoint's "
            "cross_site.dp_noise, or start a new run (a new run.dir) for a guarantee at the new one")
