"""Where `pretrain data import` writes: checks on OUT, a staging folder, and the swap once an import worked.

An import must never destroy data it still needs or leave output that looks finished when it is not:

* OUT may not contain anything the import reads (re-sharding `d/shard-{000000..000003}.tar` into `d`
  would replace source shards before the reader opened them), with or without --overwrite;
* a non-empty OUT is refused unless --overwrite is given (a second import into a used folder used to leave
  the old shards past the new last one, missing from the new sizes.json, for a brace spec to mix in);
* shards are written into `OUT/.import-tmp/`; only when the whole import succeeded do they replace the
  previous import *with the same prefix* (`{prefix}-NNNNNN.tar`), and sizes.json / stats.json are rewritten
  keeping the entries of other prefixes' shards. A failed import removes its staging folder and leaves OUT
  as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .files import write_text_atomic

logger = logging.getLogger("data_pipelines")

STAGING = ".import-tmp"
SIZES, STATS = "sizes.json", "stats.json"
OTHER_PREFIXES = "other_prefixes"
"""stats.json key: the stats of earlier imports with another --prefix whose shards are still in OUT."""


def shard_pattern(prefix: str) -> re.Pattern[str]:
    """File names of an import's shards: `{prefix}-NNNNNN.tar` (six or more digits)."""
    return re.compile(rf"{re.escape(prefix)}-\d{{6,}}\.tar")


def check_prefix(prefix: str) -> None:
    """A prefix is a file-name start, not a path: it must not reach outside OUT or hide the shards."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix or ""):
        raise ValueError(f"--prefix {prefix!r}: use letters, digits, '_', '-' and '.' (not starting with "
                         "'.' or '-'): it starts each shard's file name in OUT")


def check_out(out: Path, sources: list[str], prefix: str, overwrite: bool) -> None:
    """Refuse an OUT that holds any of `sources` (always) or anything at all (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} exists and is not a folder")
    real_out = os.path.realpath(out)
    inside = real_out.rstrip(os.sep) + os.sep
    for source in sources:
        real = os.path.realpath(source)
        if real == real_out or real.startswith(inside):
            raise ValueError(f"OUT {out} contains {source}, which this import reads: the new shards would "
                             "replace or delete its data (even with --overwrite); import into a new folder, "
                             "then move the shards")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not overwrite:
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise ValueError(f"OUT {out} is not empty ({', '.join(entries[:5])}{more}): choose a new or empty "
                         f"folder, or pass --overwrite to replace the import with --prefix {prefix} there "
                         f"({prefix}-NNNNNN.tar and their sizes.json/stats.json entries, swapped only once "
                         "the new import has succeeded; other files stay)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("replacing unreadable %s: %s", path, exc)
        return {}
    return loaded if isinstance(loaded, dict) else {}


class Staging:
    """`OUT/.import-tmp/` while an import runs: `commit` swaps its shards into OUT, `abandon` removes it."""

    def __init__(self, out: Path, prefix: str) -> None:
        self.out, self.prefix = out, prefix
        self._created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.dir = out / STAGING
        if self.dir.exists():  # check_out let it through: --overwrite was given
            logger.warning("removing %s, left by an import that did not finish", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        self._swapping = False

    def abandon(self) -> None:
        """Remove the staging folder (and OUT, if this import created it and it is empty again). Stopped
        while `commit` was moving shards into OUT, it keeps the folder: OUT then holds part of the old and
        part of the new import (no sizes.json), and the new shards not yet moved are still there."""
        if self._swapping:
            logger.error("import stopped while moving its shards into %s: that folder holds part of the "
                         "previous import and part of this one, with no sizes.json; the shards not moved yet "
                         "are in %s. Run the import again with --overwrite", self.out, self.dir)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._created:
            with contextlib.suppress(OSError):  # only if nothing else was put there meanwhile
                self.out.rmdir()

    def _write_json(self, name: str, obj: dict[str, Any]) -> None:
        write_text_atomic(self.out / name, json.dumps(obj, indent=1) + "\n")

    def commit(self, shards: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Move the staged `shards` into OUT over the previous import with this prefix, delete that
        import's other shards, then write sizes.json and stats.json (`stats`, plus the stats of other
        prefixes still present under `other_prefixes`)."""
        ours = shard_pattern(self.prefix)
        present = {p.name for p in self.out.iterdir() if p.is_file()}
        sizes = {str(name): int(count) for name, count in _read_json(self.out / SIZES).items()
                 if not ours.fullmatch(str(name)) and name in present and isinstance(count, int)}
        old = _read_json(self.out / STATS)
        others = old.get(OTHER_PREFIXES)
        others = dict(others) if isinstance(others, dict) else {}
        options = old.get("options")
        old_prefix = options.get("prefix") if isinstance(options, dict) else None
        if isinstance(old_prefix, str):
            others[old_prefix] = {k: v for k, v in old.items() if k != OTHER_PREFIXES}
        others = {p: s for p, s in sorted(others.items())
                  if p != self.prefix and any(shard_pattern(p).fullmatch(n) for n in present)}
        if others:
            stats = {**stats, OTHER_PREFIXES: others}
        self._swapping = True
        for name in (SIZES, STATS):  # while shards move, OUT must not look like a finished import
            (self.out / name).unlink(missing_ok=True)
        new = {s["name"] for s in shards}
        for name in sorted(new):
            os.replace(self.dir / name, self.out / name)
        for name in sorted(present):
            if ours.fullmatch(name) and name not in new:
                (self.out / name).unlink()
        sizes.update({s["name"]: s["samples"] for s in shards})
        self._write_json(SIZES, dict(sorted(sizes.items())))
        self._write_json(STATS, stats)
        self._swapping = False
        shutil.rmtree(self.dir)
