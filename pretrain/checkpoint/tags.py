"""Which checkpoints a root holds, in which order they were saved, and which ones retention keeps.

A checkpoint `<root>/<tag>` is complete once its marker `mmpt_complete.json` is there (`atomic.save_atomic`
writes it last). The marker records `seq`, the save's place in the root's save order (one more than the
largest there when it was published), and `saved_at`. Save order, not the step number, says which
checkpoint is newest, because a run may go back: after `--resume <root>/global_step40` in a run that had
saved up to step 50 (a rollback, e.g. after a loss spike), the new branch's saves (42, 44, ...) are newer
than the abandoned step 50. So
- `keep_last` keeps the N most recently saved checkpoints (by step it would delete the checkpoint resumed
  from at the first new save and keep the abandoned ones forever);
- the `latest` fallback (`latest` lost, or naming an incomplete folder) takes the most recent save.

A resume from a checkpoint that is not the root's most recent save (`note_resume`, rank 0) makes it the
most recent: it writes `<tag>/mmpt_resumed.json` ({"seq", "resumed_at", "abandoned"}; the marker itself is
never rewritten, its sha256 identifies the checkpoint: `DeepSpeedSource.fingerprint`), points `latest` at
it and logs the abandoned tags; nothing is deleted then, and retention later removes them as it removes any
older save. Checkpoints written before save orders were recorded sort before every recorded one, by step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

from pretrain.checkpoint.best import best_tag
from pretrain.checkpoint.tensor_files import MANIFEST, write_text_atomic

log = logging.getLogger("mmpt.checkpoint")
MARKER = "mmpt_complete.json"
RESUMED = "mmpt_resumed.json"
UNIVERSAL = "universal"
"""`<root>/universal/<tag>`: universal copies of the root's checkpoints (`checkpoint.universal=true`, or a
resume at another layout), with their own `latest` (`resume.save_universal`)."""
STAGING = ".staging"
"""`<root>/.staging`: where saves are written before they are published (`atomic.save_atomic`) and where
retention moves a folder before deleting it (`_discard`); hidden, read by no listing of checkpoints, removed
by `--overwrite-run`."""
PRUNED = ".pruned"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else -1


def is_save_name(name: str) -> bool:
    """Whether a folder named `name` can be a published save: every staging folder is hidden (`.staging`,
    `staged_output`'s `.<tag>.tmp-<pid>` and `.<tag>.old-<pid>`). A kill just before the final rename leaves
    one holding every file of a complete save, and `step_of` would read its PID as the step (the newest save
    when markers record no `seq`), so listings of saves skip them."""
    return not name.startswith(".")


def model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model states in a DeepSpeed tag folder: the module and our client state."""
    files = sorted(Path(tag_dir).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no *_model_states.pt file; not a DeepSpeed checkpoint")
    rank0 = [f for f in files if re.search(r"(zero_pp_rank_0_)?mp_rank_00_model_states\.pt$", f.name)]
    return rank0[0] if rank0 else files[0]


def written_by_mmpt(tag_dir: Path) -> bool:
    """Whether a DeepSpeed tag folder was written by mmpt training, told without trusting its files: a resume
    note (`RESUMED`), or our client state (the `mmpt` key) in rank 0's model states, parsed weights-only and
    memory-mapped (only the pickle is read, no tensor data; a file holding code is refused, named). Such a
    folder without its marker is refused (`atomic.verify_marker`); plain DeepSpeed folders are not."""
    from pretrain.checkpoint.weights_only import mmap_load, safe_load

    tag_dir = Path(tag_dir)
    if (tag_dir / RESUMED).is_file():
        return True
    if not any(tag_dir.glob("*model_states.pt")):
        return False
    states = model_states_file(tag_dir)
    state = mmap_load(states) if zipfile.is_zipfile(states) else safe_load(states)
    return isinstance(state, dict) and "mmpt" in state


def unmarked(tag_dir: Path) -> str:
    """The refusal of an mmpt checkpoint folder without its marker (`written_by_mmpt`)."""
    return (f"{tag_dir}: an mmpt checkpoint without its completion marker {MARKER}: its save did not "
            "complete, its deletion (checkpoint retention) was interrupted, or the marker was removed, so "
            "its files cannot be checked against their sha256s; refusing to load it. Use a complete "
            f"checkpoint (one whose folder holds {MARKER}; `--resume latest` takes the newest)")


def complete_tags(root: Path) -> list[str]:
    """Tags under `root` whose folder carries the completion marker (staging folders never), in step order."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and is_save_name(p.name) and (p / MARKER).is_file()]
    return sorted(tags, key=step_of)


def _seq(path: Path) -> int:
    """The `seq` a marker or resume note records; 0 when absent or unreadable (older checkpoints)."""
    try:
        value: Any = json.loads(path.read_text()).get("seq")
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def save_key(root: Path, tag: str) -> tuple[int, int]:
    """(save order, step) of `root/tag`: the later of its save and of a resume from it (`note_resume`)."""
    folder = Path(root) / tag
    return max(_seq(folder / MARKER), _seq(folder / RESUMED)), step_of(tag)


def saved_order(root: Path) -> list[str]:
    """The complete checkpoints of `root`, least recently saved (or resumed from) first."""
    return sorted(complete_tags(root), key=lambda t: save_key(root, t))


def next_seq(root: Path) -> int:
    """The save order of the next checkpoint published under `root`."""
    return 1 + max((save_key(root, t)[0] for t in complete_tags(root)), default=0)


def _named(pointer: Path) -> str:
    return pointer.read_text().strip() if pointer.is_file() else ""


def latest_tag(root: Path) -> str | None:
    """The tag `latest` names if that folder is complete; else the most recently saved complete one.

    Folders written by plain DeepSpeed (no marker) are accepted when `latest` names them, so checkpoints
    from other tools still load (one written by mmpt is then refused at load: `written_by_mmpt`)."""
    root = Path(root)
    named = _named(root / "latest")
    complete = complete_tags(root)
    if named and (named in complete or (not complete and (root / named).is_dir())):
        return named
    if complete:
        newest = saved_order(root)[-1]
        if named:
            log.warning("%s/latest names %r, which is not a complete checkpoint; using %s (the most recent "
                        "save)", root, named, newest)
        return newest
    return None


def note_resume(root: Path, tag: str) -> list[str]:
    """A run resumes from `root/tag` and saves into `root`: if other checkpoints there were saved after it
    (a rollback), make `tag` the most recent save (module docstring) and point `latest` (and, when `tag` has
    a universal copy, `universal/latest`) at it, so neither retention nor a `--resume latest` after a crash
    takes the abandoned branch for the run's newest state. Returns the abandoned tags; an ordinary resume
    from the most recent save writes nothing and returns []. Rank 0 only."""
    root = Path(root)
    order = saved_order(root)
    if tag not in order or order[-1] == tag:
        return []
    abandoned = order[order.index(tag) + 1:]
    note = {"seq": next_seq(root), "resumed_at": time.time(), "abandoned": abandoned}
    write_text_atomic(root / tag / RESUMED, json.dumps(note, indent=1))
    write_text_atomic(root / "latest", tag)
    copies = root / UNIVERSAL
    if (copies / "latest").is_file() and (copies / tag / "universal.json").is_file():
        write_text_atomic(copies / "latest", tag)
    log.warning("resuming from %s/%s, which was saved before %s: those checkpoints belong to an abandoned "
                "branch. %s is now this run's latest checkpoint, the new saves count after it, and retention "
                "(checkpoint.keep_last) removes the abandoned ones as it removes any older save (keep_every "
                "and keep_best still keep theirs); a same-step save replaces one. Copy any you want to keep.",
                root, tag, ", ".join(abandoned), tag)
    return abandoned


_UNIVERSAL_FILES = ("universal.json", MANIFEST)
"""What makes `<root>/universal/<tag>` a copy to readers (`sources.UNIVERSAL_META`; `resume.open_universal`'s
fallback also wants the manifest)."""


def _discard(folder: Path, root: Path, name: str, visible_by: tuple[str, ...]) -> None:
    """Delete a checkpoint folder so that no reader ever sees it half deleted: first it leaves its name, in
    one atomic rename to `<root>/.staging/<name>.pruned`, then its files go. A kill (or an error) inside
    `rmtree` would otherwise leave `<tag>` with its marker and some of its files gone (rmtree's order is the
    directory's), listed as complete (`complete_tags`, the eval suite's tags) and refused only at load.
    Should the rename fail (a `.staging` that is not a folder, `universal` on another file system), the
    files that make the folder visible (`visible_by`: the marker; a copy's universal.json and manifest) go
    first. Leftovers of an interrupted delete are removed by the next prune (`_empty_trash`)."""
    if not folder.is_dir():
        return
    trash = root / STAGING / f"{name}{PRUNED}"
    try:
        trash.parent.mkdir(exist_ok=True)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
    except OSError as e:
        log.debug("could not move %s to %s (%s); removing its marker first", folder, trash, e)
        for f in visible_by:
            with contextlib.suppress(OSError):
                (folder / f).unlink(missing_ok=True)
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def _empty_trash(root: Path) -> None:
    """Finish deletes an earlier prune started and a kill interrupted (`_discard`)."""
    trash = Path(root) / STAGING
    if trash.is_dir():
        for p in trash.iterdir():
            if p.name.endswith(PRUNED) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete complete checkpoints outside the retention policy; return the deleted tags.

    Kept: the `keep_last` most recent saves, every step divisible by `keep_every`, the one `latest` names and
    `best.json`'s (checkpoint.keep_best). A deleted checkpoint's universal copy goes with it, except the one
    `universal/latest` names: it stays until `save_universal` has written the next copy and pointed
    `universal/latest` at it, so `checkpoints/universal` always holds a complete copy. Each folder leaves
    its name before its files go (`_discard`): an interrupted prune never leaves a half-deleted checkpoint
    that looks complete."""
    root = Path(root)
    order = saved_order(root)
    keep = set(order[-keep_last:]) if keep_last else set(order)
    if keep_every:
        keep |= {t for t in order if step_of(t) % keep_every == 0}
    keep |= {_named(root / "latest")} | {best_tag(root)}
    newest_copy = _named(root / UNIVERSAL / "latest")
    removed = [t for t in order if t not in keep]
    _empty_trash(root)
    for t in removed:
        _discard(root / t, root, t, (MARKER,))
        if t != newest_copy:
            _discard(root / UNIVERSAL / t, root, f"{UNIVERSAL}-{t}", _UNIVERSAL_FILES)
    if removed:
        newest = step_of(order[-1])
        later = [t for t in removed if step_of(t) > newest]
        log.info("removed old checkpoints %s (keep_last=%d keep_every=%d, counted in save order)%s", removed,
                 keep_last, keep_every, f"; {later} came from a branch abandoned by a resume from an earlier "
                 "step" if later else "")
    return removed


def prune_universal_copies(root: Path) -> list[str]:
    """Delete the universal copies whose DeepSpeed checkpoint retention removed, except the one
    `universal/latest` names; run after a new copy and its `latest` are written. Returns their tags."""
    root = Path(root)
    copies = root / UNIVERSAL
    if not copies.is_dir():
        return []
    kept = set(complete_tags(root)) | {_named(copies / "latest")}
    removed = sorted((p.name for p in copies.iterdir()
                      if p.is_dir() and p.name.startswith("global_step") and p.name not in kept), key=step_of)
    _empty_trash(root)
    for t in removed:
        _discard(copies / t, root, f"{UNIVERSAL}-{t}", _UNIVERSAL_FILES)
    return removed
