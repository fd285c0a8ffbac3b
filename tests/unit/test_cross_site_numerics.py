"""Training across sites, what a site releases and accepts: DP noise nobody outside the site can regenerate,
non-finite values refused on the way out and on the way in, fp16 saturation, what `dp_clip` bounds on the
bytes that leave a site, and the outer step in the join fingerprint (real TCPStore on loopback)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import torch

from launch.rendezvous import free_port
from parallel.cross_site import OuterLoop, contribution
from parallel.cross_site_codec import CHUNK, FP16_MAX, ErrorFeedback, decode, encode
from parallel.cross_site_privacy import clip_scale, gaussian_noise, noise_seed
from parallel.cross_site_store import CrossSiteError, Rendezvous, check_fingerprint, serve
from parallel.settings import CrossSiteConfig
from pretrain.checkpoint.cross_site import fingerprint
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _loop(site: str = "s", rank: int = 0, compress: str = "none", **cfg) -> OuterLoop:
    """The parts of an OuterLoop that `_release` and the encoding use (single process: the site is this
    rank)."""
    loop = OuterLoop.__new__(OuterLoop)
    loop.cfg = CrossSiteConfig(site=site, compress=compress, **cfg)
    loop.device, loop.rank = torch.device("cpu"), rank
    loop.feedback = ErrorFeedback(compress, 0)
    return loop


def _public_noise(n: int, site: str, k: int, rank: int) -> torch.Tensor:
    """Unit noise regenerated the way anyone could from what the store's key r<k>/d/<site>/<rank> tells:
    a generator seeded from (site, round, rank) (the scheme the noise used to follow)."""
    digest = hashlib.sha256(f"mmpt-cross-site/{site}/{k}/{rank}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(n, generator=gen)


def _site(store, name: str) -> Rendezvous:
    rv = Rendezvous(store, name, 0, "test", 2.0, expected_sites=2)
    rv.register()
    return rv


# ------------------------------------------------------------------------------------------ #1 noise
def test_dp_noise_cannot_be_regenerated_from_public_values_and_has_the_configured_scale():
    """Two releases of the same values by the same (site, round, rank) carry independent noise, and noise
    regenerated from those public values explains none of it: an observer can no longer subtract it."""
    n, site, k, rank = 100_000, "eu", 7, 3
    zero = torch.zeros(n)
    first = _loop(site, rank, dp_clip=2.0, dp_noise=0.5)._release(zero.clone(), k)
    again = _loop(site, rank, dp_clip=2.0, dp_noise=0.5)._release(zero.clone(), k)
    for noise in (first, again):  # N(0, (dp_noise x dp_clip)^2): std 1, Gaussian (68.3% within 1 std)
        assert noise.mean().abs() < 0.02 and noise.std().item() == pytest.approx(1.0, rel=0.02)
        assert (noise.abs() < 1.0).float().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert torch.corrcoef(torch.stack([first, again]))[0, 1].abs() < 0.02  # never reused
    public = _public_noise(n, site, k, rank)
    assert torch.corrcoef(torch.stack([first, public]))[0, 1].abs() < 0.02
    # the review's attack: fit the public noise to the payload and subtract it; the payload's noise stays
    secret = torch.randn(n) * (0.9 / n ** 0.5)
    payload = _loop(site, rank, dp_clip=1.0, dp_noise=4.0)._release(secret.clone(), k)
    fitted = float(payload @ public / (public @ public))
    assert abs(fitted) < 0.1  # 4.0 if the noise came from (site, round, rank)
    assert (payload - fitted * public - secret).norm() > 0.95 * (payload - secret).norm()


def test_noise_comes_from_a_fresh_secret_each_release():
    seeds = {noise_seed() for _ in range(100)}
    assert len(seeds) == 100 and all(len(s) == 32 for s in seeds)
    key = noise_seed()
    like = torch.zeros(3, 5)
    assert torch.equal(gaussian_noise(like, 1.0, key), gaussian_noise(like, 1.0, key))  # a function of it
    assert gaussian_noise(like, 1.0, key).shape == (3, 5)
    with pytest.raises(ValueError, match="seed of 8 bytes is too short"):
        gaussian_noise(like, 1.0, b"12345678")


# ------------------------------------------------------------------------------------------ #3 fingerprint
@pytest.mark.parametrize("key,mine,theirs", [("cross_site.outer_lr", 0.7, 1.0),
                                             ("cross_site.outer_momentum", 0.9, 0.0)])
def test_a_site_with_another_outer_step_is_refused_naming_the_key(key, mine, theirs):
    """Every site applies the outer step to the same average on its own: a different outer_lr or momentum
    would make the sites' weights drift apart while every log says '2 site(s)'."""
    base = ["run.dir=x", "cross_site.sites=2", "cross_site.rendezvous=127.0.0.1:29400"]
    a = fingerprint(load_config(None, [*base, "cross_site.site=a"]), "{}")
    b = fingerprint(load_config(None, [*base, "cross_site.site=b", f"{key}={mine}"]), "{}")
    address = f"127.0.0.1:{free_port()}"
    store = serve(address)
    check_fingerprint(store, "a", a, address)
    check_fingerprint(store, "c", dict(a), address)  # the same settings join
    refused = rf"site b refuses to join .*: {key} differ \({key}: {mine} here, {theirs} there\)"
    with pytest.raises(CrossSiteError, match=refused):
        check_fingerprint(store, "b", b, address)
    requirements = (ROOT / "docs" / "cross_site.md").read_text().split("Requirements, checked")[1][:800]
    assert f"`{key}`" in requirements


# ------------------------------------------------------------------------------------------ #7 non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dp", [{}, {"dp_clip": 1.0}, {"dp_clip": 1.0, "dp_noise": 1.0}])
def test_a_site_whose_training_diverged_sends_nothing(bad, dp):
    delta = torch.full((2 * CHUNK,), 1e-3)
    delta[3] = bad
    refused = (r"cross-site round 4: site s's pseudo-gradient \(synced - current weights\) has 1 NaN or inf "
               r"values \(1 on rank 0\): the site's training diverged.*nothing was sent")
    with pytest.raises(CrossSiteError, match=refused):
        _loop(**dp)._release(delta, 4)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "sign"])
def test_nan_or_inf_is_never_encoded_and_never_enters_the_residual(codec):
    """One inf used to make its whole int8/sign chunk NaN and, through error feedback, every later round."""
    ef = ErrorFeedback(codec, 2 * CHUNK)
    x = torch.full((2 * CHUNK,), 1e-3)
    ef.encode(x)
    residual = ef.residual.clone()
    x[3] = float("inf")
    x[CHUNK + 1] = float("nan")
    with pytest.raises(ValueError, match=rf"2 of the {2 * CHUNK} values to encode \({codec}\) are NaN or "):
        ef.encode(x)
    assert torch.equal(ef.residual, residual) and bool(ef.residual.isfinite().all())
    payload, sent = ef.encode(torch.full((2 * CHUNK,), 1e-3))  # the next round goes on as before
    assert bool(sent.isfinite().all()) and bool(ef.residual.isfinite().all())


def test_fp16_saturates_instead_of_overflowing_and_huge_sign_chunks_stay_finite():
    x = torch.tensor([7e4, -1e6, 65504.0, 1.5, -3e38])
    assert decode(encode(x, "fp16")).tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, 1.5, -FP16_MAX]
    big = torch.full((CHUNK,), 3e38)  # the chunk's sum of |x| overflows fp32; its mean does not
    got = decode(encode(big, "sign"))
    assert bool(got.isfinite().all()) and got[0].item() == pytest.approx(3e38, rel=1e-6)


def test_clip_scale_refuses_a_norm_that_is_not_finite():
    for sq in (float("nan"), float("inf")):  # used to give nan (passed through) and 0 (then inf x 0 = nan)
        with pytest.raises(ValueError, match=f"cross_site.dp_clip: .* squared norm is {sq}, not a finite"):
            clip_scale(sq, 1.0)
    assert clip_scale(float("nan"), 0.0) == 1.0  # clipping off: the norm is not looked at


def _raw(codec: str, n: int, body: bytes) -> bytes:
    return struct.pack("<4sQ", codec.encode().ljust(4, b" "), n) + body


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "sign"])
def test_a_peer_payload_with_nan_or_inf_is_refused_naming_site_round_and_rank(codec):
    """Averaged in, one site's NaN would make every site's weights NaN, with no message naming it."""
    n = CHUNK + 3
    bodies = {  # what a buggy or diverged site could post: well-formed, the right size, not finite
        "none": torch.full((n,), float("nan")).numpy().tobytes(),
        "fp16": torch.full((n,), float("inf")).half().numpy().tobytes(),
        "int8": torch.tensor([float("inf"), 1.0]).numpy().tobytes() + bytes(n),  # an inf scale
        "sign": torch.tensor([1.0, float("nan")]).numpy().tobytes() + bytes(-(-n // 8)),  # a NaN scale
    }
    store = serve(f"127.0.0.1:{free_port()}")
    a, b = _site(store, "a"), _site(store, "b")
    b.post(5, _raw(codec, n, bodies[codec]))
    where = "cross-site round 5: site b's payload for rank 0"
    bad = {"none": n, "fp16": n, "int8": CHUNK, "sign": 3}[codec]
    with pytest.raises(CrossSiteError, match=f"{where} has {bad} NaN or inf values \\(of {n}\\): that site's "
                                             "training diverged or its payload is corrupted"):
        contribution(a.fetch(5, "b"), n, where, "h:1")
    b.post(6, encode(torch.full((n,), 2.0), codec))  # a finite payload still passes
    assert torch.allclose(contribution(a.fetch(6, "b"), n, where, "h:1"), torch.full((n,), 2.0))


# ------------------------------------------------------------------------------------------ #10 clip bound
@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "sign"])
def test_what_dp_clip_bounds_on_the_bytes_that_leave_a_site(codec):
    """The bound docs/cross_site.md and the setting's docstring state, checked on the decoded payloads: per
    round with `none` (fp16: up to its rounding); int8 and sign send what rounding held back earlier too,
    so only the running sum is bounded (k x dp_clip + |residual|), and one round can exceed dp_clip."""
    doc = " ".join((ROOT / "docs" / "cross_site.md").read_text().split())
    settings = " ".join((ROOT / "parallel" / "settings.py").read_text().split())
    for text in (doc, settings):
        assert "<= k x dp_clip + " in text and "one round's payload can exceed dp_clip" in text
    torch.manual_seed(0)
    n, clip = 1 << 16, 1.0
    base = torch.randn(n) * torch.rand(n) ** 8  # a steady drift, norm far above the clip
    loop = _loop(compress=codec, dp_clip=clip)
    loop.feedback = ErrorFeedback(codec, n)
    total, worst = torch.zeros(n, dtype=torch.float64), 0.0
    for k in range(1, 51):
        payload, _ = loop.feedback.encode(loop._release(base.clone(), k))
        sent = decode(payload)  # what the other sites read
        total += sent.double()
        worst = max(worst, float(sent.double().norm()))
        bound = k * clip + float(loop.feedback.residual.double().norm())
        assert total.norm() <= bound * (1 + 1e-5), k
    if codec == "none":
        assert worst <= clip * (1 + 1e-6)
    elif codec == "fp16":
        assert worst <= clip * (1 + 2 ** -11) + 2 ** -25 * n ** 0.5
    elif codec == "sign":
        assert worst > 4 * clip  # what the docs warn of: one round well over dp_clip
