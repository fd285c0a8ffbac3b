"""What a run directory already holds, checked before a run writes into it.

A start from step 0 (no `--resume`: from scratch or `--init-from`) into a run.dir (or checkpoint.dir) that
holds another run would replace that run's checkpoints of the same steps, move `latest` back while its later
checkpoints stay, and append a second series to metrics.jsonl. Such a start is refused, naming the folder
and the ways out; `--overwrite-run` starts over after deleting the old run's outputs (named in the log).
A `--resume` at or past `train.steps` has nothing to train: it says so and leaves the run as it is.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from data_pipelines.audit import keys_dir
from pretrain.checkpoint import atomic as ckpt
from pretrain.config import Config, ConfigError

log = logging.getLogger("mmpt.train")

RUN_OUTPUTS = ("metrics.jsonl", "metrics.dropped.jsonl", "summary.json", "tensorboard", "keys",
               "tokenizer.json", "zeroshot.safetensors", "wise_ft.json")
"""What one run writes into RUN_DIR: `--overwrite-run` deletes them. tokenizer.json too: a start without a
checkpoint reuses one it finds (a job killed before its first save), which after `--overwrite-run` may
have been trained on other data. A fine-tune's zero-shot weights and WiSE-FT sweep
(`pretrain.evaluation.wise_ft.ZEROSHOT_FILE`, `RESULT_FILE`) belong to the deleted run: a new run without
`--wise-ft` (or a pretraining one) would leave them beside its own outputs. config.yaml and memory.json are
rewritten by the new run; other files are left alone."""
CHECKPOINT_FILES = ("latest", "universal", "best.json", "zero_to_fp32.py", "zero_to_torch.py")
"""Entries of a checkpoint root besides its tag folders (`global_stepN`) and hidden staging folders."""
_TAG = re.compile(r"^global_step\d+$")
_STAGING = re.compile(r"^(\.staging|\.global_step\d+\.(tmp|old)-\d+)$")
"""The hidden folders a save leaves in a checkpoint root: atomic.STAGING and `staged_output`'s
`.<tag>.tmp-<pid>` / `.<tag>.old-<pid>`. Only these: checkpoint.dir may hold `.git` or a `.venv`."""


def _metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if line.strip())


def _describe(cfg: Config) -> str:
    """`run.dir=X` (and `checkpoint.dir=Y` when set), as the user gave them."""
    where = f"run.dir={cfg.run.dir}"
    return f"{where} (checkpoint.dir={cfg.checkpoint.dir})" if cfg.checkpoint.dir else where


def _held(cfg: Config) -> list[str]:
    """What of an earlier run the configured folders hold: its newest checkpoint, its metrics rows."""
    root, run_dir = ckpt.checkpoint_root(cfg), Path(cfg.run.dir)
    found = []
    tag = ckpt.latest_tag(root)
    if tag is not None:
        found.append(f"checkpoint {root / tag}")
    rows = _metrics_rows(run_dir)
    if rows:
        found.append(f"{run_dir / 'metrics.jsonl'} with {rows} row(s)")
    return found


def _inside(path: Path, folders: list[Path]) -> bool:
    """Whether `path` is one of `folders` or lies inside one."""
    real = path.resolve()
    return any(real == f.resolve() or f.resolve() in real.parents for f in folders)


def _delete_checkpoints(root: Path) -> list[str]:
    """Remove the checkpoints of `root` (tag folders, staging folders, `latest`, universal copies,
    best.json, DeepSpeed's helper scripts); anything else there stays, and so does the folder if not empty
    (checkpoint.dir may be a folder that holds other things too)."""
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not (_TAG.match(name) or _STAGING.match(name) or name in CHECKPOINT_FILES
                or (entry / ckpt.MARKER).is_file()):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(str(entry))
    if not any(root.iterdir()):
        root.rmdir()
    return removed


def _delete_run(cfg: Config) -> list[str]:
    run_dir = Path(cfg.run.dir)
    removed = _delete_checkpoints(ckpt.checkpoint_root(cfg))
    for name in RUN_OUTPUTS:
        path = keys_dir(run_dir) if name == "keys" else run_dir / name
        if name == "tokenizer.json" and cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve() == \
                path.resolve():
            continue  # the user's own tokenizer file (data.tokenizer names it): an input, not an output
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(str(path))
    return removed


def check_start(cfg: Config, resume: str | None, init_from: str | None, overwrite: bool, rank: int) -> None:
    """Before any process group: refuse a start from step 0 into a folder that holds another run (every rank
    refuses alike, reading the same folders), or with `overwrite` delete that run's outputs (rank 0; the
    others wait for it at the process group's set-up). A `--resume` is never refused here."""
    if resume is not None:
        if overwrite:
            raise ConfigError(f"--overwrite-run with --resume {resume}: --overwrite-run starts the run over "
                              "(deleting its checkpoints); leave it out to resume")
        return
    if overwrite and rank != 0:  # rank 0 may be deleting that run's files right now: nothing to read here
        return
    found = _held(cfg)
    if not found:
        return
    if overwrite and init_from and _inside(Path(init_from), [ckpt.checkpoint_root(cfg), Path(cfg.run.dir)]):
        raise ConfigError(f"--overwrite-run with --init-from {init_from}: the weights to start from are in "
                          f"the run it would delete ({_describe(cfg)}); export them first (`pretrain convert "
                          f"{init_from} DST --to safetensors`) or choose a new run.dir")
    if not overwrite:
        start = f"from the weights of --init-from {init_from}" if init_from else "from scratch"
        raise ConfigError(
            f"{_describe(cfg)} already holds a run: {'; '.join(found)}. Starting {start} at step 0 would "
            "overwrite its checkpoints and add a second series to its metrics. To continue that run pass "
            "`--resume latest`; to keep it, choose a new run.dir; to start over, pass --overwrite-run "
            f"(deletes its checkpoints, {', '.join(RUN_OUTPUTS)} first)")
    removed = _delete_run(cfg)
    log.warning("--overwrite-run: %s held a run (%s); deleted %s", _describe(cfg), "; ".join(found),
                ", ".join(removed))


def nothing_to_train(cfg: Config, client: dict[str, Any] | None, describe: str, root: Path,
                     rank: int) -> dict[str, Any] | None:
    """For a resume whose checkpoint is at or past `train.steps`: a warning (rank 0) and the summary to
    report, which is the run's summary.json as it was (not rewritten: it holds the finished run's final
    metrics) with `nothing_to_train: true`; None when there are steps to train."""
    if client is None or int(client["step"]) < cfg.train.steps:
        return None
    step, run_dir = int(client["step"]), Path(cfg.run.dir)
    if rank == 0:
        log.warning("checkpoint %s is at step %d and train.steps is %d: nothing to train. %s and the "
                    "checkpoints are left as they are (raise train.steps to train further)", describe, step,
                    cfg.train.steps, run_dir / "summary.json")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        summary = {"steps": step, "start_step": step, "run_dir": str(run_dir), "checkpoint": str(root)}
    return {**summary, "nothing_to_train": True}
