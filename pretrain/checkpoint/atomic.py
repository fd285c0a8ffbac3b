"""Checkpoints: standard DeepSpeed layout (`latest`, `<tag>/zero_pp_rank_*_model_states.pt`) plus our
client state (step, config, tokenizer, data position, RNG), written atomically, and read back for resume
and eval.

Atomic save protocol (a kill -9 or a full disk at any point leaves the previous checkpoint loadable):
1. every rank writes its DeepSpeed files into `<root>/.staging/<tag>/` (never into a live tag folder);
2. each rank fsyncs what it wrote; all ranks agree (one all_gather of each rank's error, if any) whether
   every write succeeded;
3. rank 0 writes `<tag>/mmpt_complete.json` (file names, sizes, sha256s and the save's place in the root's
   save order), fsyncs, renames the folder to `<root>/<tag>`, then replaces `latest` through a fsynced
   temporary file and a rename.
A folder without `mmpt_complete.json` is never resumed from; `--resume latest` takes the most recently saved
complete checkpoint even if `latest` was lost. Save order and retention: `tags.py`.

A failure on one rank never leaves the ranks in different collectives: DeepSpeed's `save_checkpoint` runs
collectives between and after its file writes (the tag check, the all_gather of persistent ZeRO-3
parameters, a closing barrier), so a write error is recorded instead of raised
(`write_errors.deferred_write_errors`) and DeepSpeed goes on through them on every rank; every step that
may fail on one rank is followed by an agreement that every rank reaches (`consensus.failures_by_rank`),
and all ranks then raise CheckpointSaveError together, each naming the failing ranks and their errors.

Loading (`load_deepspeed`): every rank checks exactly the files DeepSpeed will read on it (`deepspeed_reads`:
sha256 against the marker, then a weights-only parse), all ranks stop together if any file is refused, and
DeepSpeed's own load runs with every torch.load forced weights-only (`weights_only.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel import groups
from parallel.consensus import any_rank, failures_by_rank
from pretrain import faults
from pretrain.checkpoint.tags import (  # noqa: F401 -- re-exported: `ckpt.complete_tags`, `ckpt.prune`, ...
    MARKER,
    STAGING,
    complete_tags,
    latest_tag,
    next_seq,
    note_resume,
    prune,
    saved_order,
    step_of,
    tag_for,
    unmarked,
    written_by_mmpt,
)
from pretrain.checkpoint.tags import model_states_file as _model_states_file
from pretrain.checkpoint.tensor_files import IntegrityError, file_sha256
from pretrain.checkpoint.tensor_files import fsync_dir as _fsync_dir
from pretrain.checkpoint.tensor_files import fsync_file as _fsync_file
from pretrain.checkpoint.tensor_files import write_text_atomic as _write_atomic
from pretrain.checkpoint.weights_only import (
    UnsafeCheckpointError,
    check_loadable,
    safe_load,
    weights_only_loads,
)
from pretrain.checkpoint.write_errors import deferred_write_errors
from pretrain.config import Config

log = logging.getLogger("mmpt.checkpoint")


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; nothing was published and the previous checkpoint is intact."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")


def resolve(spec: str, default_root: Path) -> tuple[Path, str] | None:
    """Map `--resume` to (checkpoint root, tag).

    `latest` means the newest checkpoint under the run's own checkpoint folder, or None when there is
    none yet (a first start and a requeued restart then share one command line). Any other value is
    a checkpoint root (holding `latest`), a tag folder inside one, or a run directory; a path that
    holds no checkpoint is an error, never a silent fresh start.
    """
    if spec == "latest":
        tag = latest_tag(default_root)
        return (default_root, tag) if tag else None
    p = Path(spec)
    for root in (p, p / "checkpoints"):
        tag = latest_tag(root)
        if tag:
            return root, tag
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise FileNotFoundError(f"no DeepSpeed checkpoint at {spec} (expected a 'latest' file, "
                            "a tag folder with *_model_states.pt, or a run directory)")


def read_client_state(root: Path, tag: str | None = None) -> dict[str, Any]:
    """The client state saved with rank 0's model states (config, tokenizer, step, data positions)."""
    tag = tag or latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint; not a checkpoint folder")
    state = safe_load(_model_states_file(Path(root) / tag))
    client = state.get("mmpt")
    if client is None:
        raise ValueError(f"{root}/{tag}: checkpoint was not written by mmpt (no 'mmpt' client state)")
    if not (Path(root) / tag / MARKER).is_file():  # before a resume builds its engine: `verify_marker`
        raise IntegrityError(unmarked(Path(root) / tag))
    return client


def consolidated_state_dict(root: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage, via DeepSpeed's own zero_to_fp32 reader (loads forced safe);
    ZeRO 0 under bf16/fp16 gives the fp32 masters of its optimizer state, not the rounded working copy."""
    tag = tag or latest_tag(root)
    tag_dir = Path(root) / str(tag)
    with weights_only_loads():
        if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        else:  # ZeRO stage 0: the weights sit whole in the model states file; bf16/fp16 masters beside them
            from pretrain.checkpoint.zero0_masters import fp32_masters

            states = torch.load(_model_states_file(tag_dir), map_location="cpu")
            sd = {**states["module"], **fp32_masters(states, str(tag_dir))}
    return {k: v.float() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ saving
def _explain(error: BaseException, where: Path) -> BaseException:
    """torch.save reports a full disk as a zip-writer RuntimeError; say what it really is."""
    if isinstance(error, OSError):
        return error
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return error
    if free < 64 * 2**20:
        return OSError(f"No space left on device ({free} bytes free under {where}; torch.save said: {error})")
    return error


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _raise_if_failed(error: BaseException | None, doing: str, root: Path, tag: str) -> None:
    """Agree over all ranks whether `doing` succeeded; if not, raise CheckpointSaveError on every rank
    (after rank 0 removed the staged files)."""
    failed = failures_by_rank(error)
    if not failed:
        return
    if _rank() == 0:
        shutil.rmtree(root / STAGING / tag, ignore_errors=True)
    _barrier()  # every rank is here: the staged files are gone before any rank goes on
    prev = latest_tag(root) or "none"
    after = (f"the newest complete checkpoint is {prev}" if doing == "publishing" else
             f"nothing was published, the previous checkpoint ({prev}) is intact")
    raise CheckpointSaveError(f"{doing} checkpoint {tag} under {root} failed on {'; '.join(failed)}; {after}")


def save_atomic(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int = 0,
                keep_every: int = 0, published: Callable[[str], None] | None = None) -> str:
    """Write a checkpoint for `step` with the protocol in the module docstring; return its tag.

    Raises CheckpointSaveError on every rank if any rank failed, naming each failing rank and its error;
    the staging folder is then removed and `latest` still names the previous complete checkpoint."""
    root = Path(root)
    tag = tag_for(step)
    staging = root / STAGING
    rank = _rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(staging / tag, ignore_errors=True)  # leftovers of a save killed mid-way
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = _explain(e, root)
    _raise_if_failed(error, "preparing", root, tag)  # (also the barrier before any rank writes)

    with deferred_write_errors(engine, step) as write_errors:
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    error = write_errors[0] if write_errors else None
    if error is None:
        try:
            for f in (staging / tag).glob(f"*rank_{groups.dp_rank()}_*"):
                _fsync_file(f)
        except OSError as e:
            error = e
    _raise_if_failed(error and _explain(error, staging), "saving", root, tag)

    faults.maybe_kill("save-before-commit", step)
    hashes, error = _gather_hashes(staging / tag)
    _raise_if_failed(error, "hashing", root, tag)
    if rank == 0:
        try:
            files = sorted(p for p in (staging / tag).iterdir() if p.is_file())
            for f in files:
                _fsync_file(f)
                if f.name not in hashes:  # files no rank claimed (e.g. ZeRO-0's single model file)
                    hashes[f.name] = file_sha256(f)
            manifest = {"tag": tag, "step": step, "seq": next_seq(root), "saved_at": time.time(),
                        "files": {f.name: f.stat().st_size for f in files},
                        "sha256": {f.name: hashes[f.name] for f in files}}
            _write_atomic(staging / tag / MARKER, json.dumps(manifest, indent=1))
            final = root / tag
            if final.exists():  # the same step saved again (after a resume): replace, old one last
                old = root / STAGING / f"{tag}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staging / tag, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging / tag, final)
            _fsync_dir(root)
            _write_atomic(root / "latest", tag)
            for helper in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's consolidation scripts
                if (staging / helper).is_file() and not (root / helper).exists():
                    shutil.copy2(staging / helper, root / helper)
        except Exception as e:  # anything: the other ranks are waiting for rank 0's verdict below
            error = _explain(e, staging)
    _raise_if_failed(error, "publishing", root, tag)
    if rank == 0 and published is not None:
        try:  # e.g. best.json (checkpoint.keep_best), before retention looks at it
            published(tag)
        except OSError as e:  # the checkpoint is published; only the note about it is missing
            log.warning("after saving %s/%s: %s", root, tag, e)
    if rank == 0 and (keep_last or keep_every):
        try:
            prune(root, keep_last, keep_every)
        except OSError as e:  # the new checkpoint is published; old ones stay until the next save
            log.warning("pruning old checkpoints under %s failed: %s", root, e)
    _barrier()
    return tag


def _own_files(tag_dir: Path) -> list[Path]:
    """The files this rank wrote in a ZeRO checkpoint: its (dp, tp) pair's (bf16 ZeRO 1-2 optimizer states
    carry DeepSpeed's `bf16_` prefix); rank 0 hashes the shared ones. On load: `deepspeed_reads`."""
    return sorted(Path(tag_dir).glob(f"*zero_pp_rank_{groups.dp_rank()}_mp_rank_{groups.tp_rank():02d}_*"))


def _gather_hashes(tag_dir: Path) -> tuple[dict[str, str], BaseException | None]:
    """sha256 of every rank's own files, computed in parallel by their writers, collected on every rank;
    and this rank's error reading its files, if any (every rank still takes part in the gather)."""
    try:
        mine, error = {f.name: file_sha256(f) for f in _own_files(tag_dir)}, None
    except OSError as e:
        mine, error = {}, e
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine, error
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: v for d in every for k, v in d.items()}, error


def verify_marker(tag_dir: Path, files: list[Path] | None = None) -> None:
    """Refuse a checkpoint folder whose files differ from its completion marker (size, then sha256).

    `files` limits the (expensive) hash check to those files (each rank checks what it reads), each of which
    the marker must list; sizes of all files are always checked. Folders written by plain DeepSpeed carry
    no marker and are not checked, but a folder written by mmpt (`written_by_mmpt`) without its marker is
    refused: every mmpt save publishes its marker with it (`save_atomic`), so one without it is incomplete or
    tampered with, and nothing would catch a corrupt file in it. Every load of a DeepSpeed checkpoint comes
    here (`verify_for_load` on resume, `sources.DeepSpeedSource` for convert, eval, embed, --init-from)."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / MARKER
    if not marker.is_file():
        if written_by_mmpt(tag_dir):
            raise IntegrityError(unmarked(tag_dir))
        return
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{marker}: not valid JSON ({e}); the checkpoint cannot be trusted") from None
    for name, size in info.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MARKER} but missing")
        if path.stat().st_size != size:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, {MARKER} says {size} (truncated or "
                                 "replaced); refusing to load it")
    check = info.get("sha256", {})
    names = [f.name for f in files] if files is not None else list(check)
    unlisted = [n for n in names if "files" in info and n not in info["files"]]
    if unlisted:
        raise IntegrityError(f"{tag_dir / unlisted[0]}: not listed in {MARKER} (added after the checkpoint "
                             "was saved); refusing to load it")
    for name in names:
        if name in check and file_sha256(tag_dir / name) != check[name]:
            raise IntegrityError(f"{tag_dir / name}: sha256 does not match {MARKER}: the file is corrupt; "
                                 "refusing to load it")


def deepspeed_reads(tag_dir: Path, elastic: bool = False) -> list[Path]:
    """The files DeepSpeed 0.19's `engine.load_checkpoint` reads on this rank (`_load_checkpoint`,
    `_get_all_zero_checkpoint_state_dicts`): of the model-states files its DP rank globs (ZeRO-3:
    `zero_pp_rank_<dp>_mp_rank_*`; ZeRO 0-2: the `mp_rank_*` files every DP rank shares, which hold the
    module, our client state and, under ZeRO-1, the frozen parameters) the one of its TP rank, when there is
    one per TP rank (else DeepSpeed merges or splits: all of them); and its own optimizer states (ZeRO's
    elastic checkpoints: every DP rank's of its TP rank; bf16 ones carry DeepSpeed's `bf16_` prefix)."""
    tag_dir = Path(tag_dir)
    dp, tp = groups.dp_rank(), groups.tp_rank()

    def this_tp(files: list[Path]) -> list[Path]:  # SDLoader: file mp_rank * n_files // mp_world, only it
        return [files[tp]] if len(files) == groups.tp_size() else files

    states = [*this_tp(sorted(tag_dir.glob(f"zero_pp_rank_{dp}_mp_rank_*_model_states.pt"))),
              *this_tp(sorted(tag_dir.glob("mp_rank_*_model_states.pt")))]  # a real folder has one kind
    optim = tag_dir.glob(f"*zero_pp_rank_{'*' if elastic else dp}_mp_rank_{tp:02d}*optim_states.pt")
    return sorted({*states, *optim})


def _fail_together(error: Exception | None) -> None:
    """Raise on every rank if any rank found `error`: a rank raises its own finding, the others the first
    failing rank's (so every rank's log names the file), and none is left waiting in a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    nccl = dist.get_backend() == "nccl"
    if not any_rank(error is not None, "cuda" if nccl else "cpu"):
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    rank, (kind, message) = next((r, e) for r, e in enumerate(every) if e is not None)
    kinds = {"UnsafeCheckpointError": UnsafeCheckpointError, "IntegrityError": IntegrityError}
    cls = kinds.get(kind, ValueError)
    raise cls(f"{message} (found by rank {rank}; every rank stops before loading)")


def verify_for_load(tag_dir: Path, elastic: bool = False) -> None:
    """Every rank checks exactly the files DeepSpeed will read on it (`deepspeed_reads`: the shared ZeRO 0-2
    model states included): sha256 against the marker, then a weights-only parse (a file holding code is
    refused by name). All ranks fail together, each naming what was found, before anything is loaded."""
    error: Exception | None = None
    try:
        reads = deepspeed_reads(tag_dir, elastic)
        verify_marker(tag_dir, reads)
        check_loadable(reads)
    except (ValueError, OSError) as e:  # IntegrityError, UnsafeCheckpointError, unreadable files
        error = e
    _fail_together(error)


def load_deepspeed(engine: Any, root: Path, tag: str) -> None:
    """DeepSpeed's own `engine.load_checkpoint(root, tag)`, without ever unpickling: every rank first
    checks what it will read (`verify_for_load`), then DeepSpeed loads with every torch.load forced
    weights-only (`weights_only_loads`)."""
    elastic = bool(getattr(engine, "zero_elastic_checkpoint", lambda: False)())
    verify_for_load(Path(root) / tag, elastic)
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {root}/{tag}")
