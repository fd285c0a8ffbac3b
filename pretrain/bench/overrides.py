"""`--set` checks shared by the benches that build each run's config themselves."""

from __future__ import annotations


def owned_key_problems(sets: list[str] | None, owned: dict[str, str | None]) -> list[str]:
    """One message per `--set KEY=VALUE` whose KEY the bench sets itself (`owned`: key -> the flag to use
    instead, or None when only the bench may set it). Such a `--set` would be overridden without a word or
    win over the flag and make the report describe another run than the one trained, so it is refused."""
    keys = [kv.split("=", 1)[0] for kv in sets or []]
    return [f"--set {k}: " + (f"use {owned[k]}" if owned[k] else "the bench sets it")
            for k in keys if k in owned]
