"""Outer states that cross sites, and what identifies one: the bytes of a member's state for a (re)joining
site (checked before a rank writes them into its weights), the digest of `synced` every site records per
round (so no site ever averages against another `synced` than the others'), and the local record of the
rounds a site has released (its epsilon must not forget rounds sent after its last checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_TENSORS = ("synced", "momentum")
STATE_FIELDS = ("round",)
RELEASES_FILE = "cross_site_releases.txt"
"""In the run directory: one line `<generation> <round>` per round this site released (before it posts)."""


def digest(synced: torch.Tensor) -> str:
    """A 128-bit fingerprint of one rank's `synced` (its exact fp32 bytes): equal on every site that applied
    the same rounds, different as soon as one bit differs."""
    flat = synced.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    h = hashlib.blake2b(f"{flat.numel()}:".encode(), digest_size=16)
    h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def encode_state(state: dict[str, Any]) -> bytes:
    """An outer state as bytes for the store: tensors as safetensors, everything else as JSON in its
    metadata. No pickle crosses sites (a peer's bytes are never unpickled, not even weights-only)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return save(tensors, metadata={"json": json.dumps(rest)})


def decode_state(data: bytes) -> dict[str, Any]:
    """The state `encode_state` wrote; ValueError when the bytes are not one (truncated, not safetensors,
    metadata that is not a JSON object, or metadata that names a tensor's key: it may not replace one)."""
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        rest = json.loads(meta.get("json", "{}"))
        tensors = load(data)
    except Exception as e:  # safetensors' own errors, JSON, a header that is not an object
        raise ValueError(f"not an outer state ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(rest, dict):
        raise ValueError("not an outer state (its metadata is not a JSON object)")
    clash = sorted(set(rest) & set(tensors))
    if clash:
        raise ValueError(f"not an outer state (metadata and tensors both name {', '.join(clash)})")
    return {**tensors, **rest}


def state_problem(state: dict[str, Any], numel: int, lowest: int, highest: int) -> str | None:
    """What is wrong with a member's outer state for a partition of `numel` values (None: nothing): other
    keys, tensors that are not flat fp32 of that size or hold NaN/inf, a round outside [lowest, highest]."""
    keys = set(STATE_TENSORS) | set(STATE_FIELDS)
    if set(state) != keys:
        return f"has keys {sorted(state)}, expected {sorted(keys)}"
    r = state["round"]
    if not isinstance(r, int) or isinstance(r, bool) or not lowest <= r <= highest:
        return f"is for round {r!r}, expected one in [{lowest}, {highest}] (the sites' rounds)"
    for name in STATE_TENSORS:
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1:
            what = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"has {name} as {what}, expected flat float32"
        if t.numel() != numel:
            return f"has {t.numel()} values of {name}, this rank's partition {numel}"
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return f"has {bad} NaN or inf values in {name}"
    return None


class ReleaseLog:
    """This site's released rounds, appended to a file of its run directory before each post (rank 0): a
    crash after the last checkpoint must not make the site forget rounds it did send. `count()` is the
    number of releases recorded (every line, whichever generation: each was a release of this site's data)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def count(self) -> int:
        if self.path is None or not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text().splitlines() if line.strip())

    def append(self, generation: str, k: int) -> None:
        if self.path is None:
            return
        with self.path.open("a") as fh:
            fh.write(f"{generation or '-'} {k}\n")
            fh.flush()
            os.fsync(fh.fileno())


def foreign_checkpoint(state: dict[str, Any], site: str) -> str | None:
    """Why a checkpoint's outer state may not be resumed by site `site`, or None: it was written by another
    site (a checkpoint copied from it, two sites sharing one run.dir or checkpoint.dir, a wrong --resume).

    Refused rather than accepted with this site's counters reset, because nothing in such a checkpoint is
    this site's own: the outer state's per-site parts (the error-feedback residual, the released rounds
    the epsilon counts, the byte counters) are the other site's, and so is everything outside the outer
    loop that `--resume` restores with it (inner weights that hold the other site's steps since its last
    round, which would then be averaged in twice; its AdamW moments; its position in the other site's
    shards). Sites sharing a checkpoint directory would also overwrite each other's checkpoints. The
    deliberate cases have a sound way that says what it does: a site that lost its checkpoints starts
    without --resume (or with --init-from: weights, fresh optimizer) and takes the running sites' outer
    state when it joins; a site renamed by mistake runs under its old name again. Checkpoints from before
    the site was recorded are not checked."""
    other = str(state.get("site") or "")
    if not other or other == site:
        return None
    return (f"site {site}: the checkpoint's outer state was written by site {other}, not by this site: "
            "each site resumes only from its own checkpoints (the residual, released rounds and byte "
            f"counters in it are site {other}'s, and so are its inner steps and data position). Give each "
            f"site its own run.dir; to bring site {site} back without its own checkpoints, start it without "
            "--resume (or with --init-from for the weights): it takes the running sites' outer state when it "
            f"joins; if this is site {other}'s own run, run it as --site {other}")
