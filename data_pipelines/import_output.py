"""Where `pretrain data import` writes: checks on OUT, a staging folder, and the swap once an import worked.

An import must never destroy data it still needs or leave output that looks finished when it is not:

* OUT may not contain anything the import reads (re-sharding `d/shard-{000000..000003}.tar` into `d`
  would replace source shards before the reader opened them), with or without --overwrite;
* a non-empty OUT is refused unless --overwrite is given (a second import into a used folder used to leave
  the old shards past the new last one, missing from the new sizes.json, for a brace spec to mix in);
* shards are written into `OUT/.import-tmp/`; only when the whole import succeeded do they replace the
  previous import *with the same prefix* (`{prefix}-NNNNNN.tar`), and sizes.json / stats.json are rewritten
  keeping the entries of other prefixes' shards. A failed import removes its staging folder and leaves OUT
  as it was;
* a staging folder the next import finds (`check_staging`) is named in the log or in the refusal: one in use
  by a running import (it holds `.lock`) is refused; one whose import stopped before it had written all its
  shards (no sizes.json there) held nothing but that unfinished output and is removed; one holding a whole
  import's shards (its sizes.json: the import stopped before or while moving them into OUT, which may then
  hold part of it and part of the previous import) is removed only by an --overwrite import with the same
  prefix, which replaces those shards anyway -- any other import is refused and told how to finish it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .files import write_text_atomic

try:
    import fcntl
except ImportError:  # not on POSIX: no lock, a staging folder in use looks like one left behind
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("data_pipelines")

STAGING = ".import-tmp"
LOCK = ".lock"
"""In the staging folder: locked (`fcntl.lockf`) by the import writing there, so the next import can tell a
folder in use from one left behind; the kernel releases it when that import's process ends, however."""
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
    """Refuse an OUT that holds any of `sources` (always), a staging folder that must stay
    (`check_staging`) or anything else at all (unless `overwrite`)."""
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
    check_staging(out, prefix, overwrite)
    entries = sorted(p.name for p in out.iterdir() if p.name != STAGING)
    refuse_non_empty(out, entries, overwrite,
                     f"the import with --prefix {prefix} there ({prefix}-NNNNNN.tar and their "
                     "sizes.json/stats.json entries, swapped only once the new import has succeeded; other "
                     "files stay)")


def refuse_non_empty(out: Path, entries: list[str], overwrite: bool, replaces: str) -> None:
    """ValueError naming OUT and what it holds (`entries`) unless it is empty or `overwrite`; `replaces` says
    what --overwrite would replace there (`data import` and `data synth` share this rule)."""
    if entries and not overwrite:
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise ValueError(f"OUT {out} is not empty ({', '.join(entries[:5])}{more}): choose a new or empty "
                         f"folder, or pass --overwrite to replace {replaces}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("replacing unreadable %s: %s", path, exc)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _in_use(staging: Path) -> bool:
    """True while another process holds the lock of `staging`: an import into the same OUT is running."""
    if fcntl is None:
        return False
    try:
        fd = os.open(staging / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)  # also releases the lock just taken
    return False


def _finished_prefix(staging: Path) -> str | None:
    """The --prefix of the import whose whole output `staging` holds (its sizes.json, which the shard writer
    writes only once every shard is written; "" when no name tells it), None for an unfinished one."""
    if not (staging / SIZES).is_file():
        return None
    try:
        names = [str(n) for n in json.loads((staging / SIZES).read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        names = []
    for name in names + sorted(p.name for p in staging.glob("*.tar")):
        match = re.fullmatch(r"(.+)-\d{6,}\.tar", name)
        if match:
            return match.group(1)
    return ""


def check_staging(out: Path, prefix: str, overwrite: bool) -> str:
    """What an import with `prefix` may do with an `OUT/.import-tmp` it finds: "" when there is none; the
    log line to remove it with when it holds no one's only copy (see the module docstring); ValueError,
    saying what to do, when it is in use or holds a whole import that this one would not replace."""
    staging = out / STAGING
    if not staging.exists() and not staging.is_symlink():
        return ""
    if staging.is_symlink() or not staging.is_dir():
        raise ValueError(f"{staging} is not a folder an import made (an import into {out} writes its shards "
                         "there first): move it away")
    if _in_use(staging):
        raise ValueError(f"{staging} is in use by another import into {out} that is still running: wait for "
                         "it to end, or import into another folder")
    finished = _finished_prefix(staging)
    if finished is None:
        return (f"removing {staging}, left by an import that stopped before it had written all its shards: "
                f"it held only that unfinished output and had moved nothing into {out}")
    if overwrite and finished == prefix:
        return (f"removing {staging}: the shards of an earlier import with --prefix {prefix} that stopped "
                f"before it had moved them all into {out}; this import replaces that prefix's shards")
    named = f"--prefix {finished}" if finished else "another --prefix"
    raise ValueError(
        f"{staging} holds the shards of an import with {named} that stopped before it had moved them all "
        f"into {out}, which may hold part of that import and part of the one before, with no sizes.json. "
        f"Run that import again with --overwrite{f' --prefix {finished}' if finished else ''} (it replaces "
        f"those shards and removes the folder); if you do not need them, delete {staging} yourself")


class Staging:
    """`OUT/.import-tmp/` while an import runs: `commit` swaps its shards into OUT, `abandon` removes it."""

    def __init__(self, out: Path, prefix: str, overwrite: bool = False) -> None:
        self.out, self.prefix = out, prefix
        self._created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.dir = out / STAGING
        stale = check_staging(out, prefix, overwrite)  # again: check_out ran before the sources were listed
        if stale:
            logger.warning("%s", stale)
            shutil.rmtree(self.dir)
        try:
            self.dir.mkdir()
        except FileExistsError:
            raise ValueError(f"{self.dir} is in use by another import into {out}, which has just started: "
                             "wait for it to end, or import into another folder") from None
        self._lock = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:  # a file system without locks: the import works, unguarded
                logger.debug("cannot lock %s: %s", self.dir / LOCK, exc)
        self._swapping = False

    def _unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def abandon(self) -> None:
        """Remove the staging folder (and OUT, if this import created it and it is empty again). Stopped
        while `commit` was moving shards into OUT, it keeps the folder: OUT then holds part of the old and
        part of the new import (no sizes.json), and the new shards not yet moved are still there."""
        self._unlock()
        if self._swapping:
            logger.error("import stopped while moving its shards into %s: that folder holds part of the "
                         "previous import and part of this one, with no sizes.json; the shards not moved yet "
                         "are in %s. Run the import again with --overwrite --prefix %s", self.out, self.dir,
                         self.prefix)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._created:
            with contextlib.suppress(OSError):  # only if nothing else was put there meanwhile
                self.out.rmdir()

    def _write_json(self, name: str, obj: dict[str, Any]) -> None:
        write_text_atomic(self.out / name, json.dumps(obj, indent=1) + "\n")

    def _metadata(self, name: str) -> dict[str, Any]:
        """OUT's sizes.json / stats.json, or the copy an import stopped while moving its shards left hidden
        (`.NAME.previous`): without it the rerun would drop the other prefixes' entries."""
        path = self.out / name
        return _read_json(path if path.is_file() else self.out / f".{name}.previous")

    def commit(self, shards: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Move the staged `shards` into OUT over the previous import with this prefix, delete that
        import's other shards, then write sizes.json and stats.json (`stats`, plus the stats of other
        prefixes still present under `other_prefixes`)."""
        ours = shard_pattern(self.prefix)
        present = {p.name for p in self.out.iterdir() if p.is_file()}
        sizes = {str(name): int(count) for name, count in self._metadata(SIZES).items()
                 if not ours.fullmatch(str(name)) and name in present and isinstance(count, int)}
        old = self._metadata(STATS)
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
        for name in (SIZES, STATS):  # while shards move, OUT must not look like a finished import; kept
            if (self.out / name).is_file():  # hidden until the new ones are written (a rerun reads them)
                os.replace(self.out / name, self.out / f".{name}.previous")
        new = {s["name"] for s in shards}
        for name in sorted(new):
            os.replace(self.dir / name, self.out / name)
        for name in sorted(present):
            if ours.fullmatch(name) and name not in new:
                (self.out / name).unlink()
        sizes.update({s["name"]: s["samples"] for s in shards})
        self._write_json(SIZES, dict(sorted(sizes.items())))
        self._write_json(STATS, stats)
        for name in (SIZES, STATS):
            (self.out / f".{name}.previous").unlink(missing_ok=True)
        self._swapping = False
        shutil.rmtree(self.dir)
        self._unlock()
