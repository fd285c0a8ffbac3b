"""A start from step 0 into a run.dir (or checkpoint.dir) holding another run is refused, naming the folder
and the ways out; `--overwrite-run` deletes that run's outputs (only those) and passes through `pretrain
launch`; a resume at or past train.steps reports the run's summary untouched (checkpoint/run_dir.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.run_dir import check_start, nothing_to_train
from pretrain.cli import build_parser, parse_args
from pretrain.config import ConfigError
from pretrain.config.loading import load_config


def _cfg(run: Path, *extra: str):
    return load_config(None, [f"run.dir={run}", *extra])


def _finished_run(run: Path, root: Path | None = None) -> Path:
    """What a finished 4-step run leaves (checkpoint files stubbed): two complete checkpoints, `latest`,
    a staging leftover, universal copies, metrics, summary, TensorBoard and key-audit folders."""
    root = root or run / "checkpoints"
    for step in (2, 4):
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / ckpt.MARKER).write_text("{}")
    (root / "latest").write_text("global_step4")
    (root / ".staging").mkdir()
    (root / "universal" / "global_step4").mkdir(parents=True)
    (root / "zero_to_fp32.py").write_text("")
    run.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    (run / "summary.json").write_text(json.dumps({"steps": 4, "final": {"loss": 1.0}}))
    (run / "tensorboard").mkdir()
    (run / "keys").mkdir()
    (run / "tokenizer.json").write_text("{}")
    return root


def test_a_fresh_start_into_a_finished_run_is_refused_naming_the_folder_and_the_ways_out(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for init_from in (None, "/w/export"):
        with pytest.raises(ConfigError) as e:
            check_start(_cfg(run), None, init_from, overwrite=False, rank=0)
        msg = str(e.value)
        assert f"run.dir={run}" in msg and str(run / "checkpoints" / "global_step4") in msg
        assert "metrics.jsonl with 4 row(s)" in msg
        assert "--resume latest" in msg and "new run.dir" in msg and "--overwrite-run" in msg
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing touched


def test_metrics_rows_alone_or_a_checkpoint_in_checkpoint_dir_are_refused_too(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    with pytest.raises(ConfigError, match="metrics.jsonl with 1 row"):
        check_start(_cfg(run), None, None, overwrite=False, rank=1)
    shared = tmp_path / "ckpts"
    _finished_run(tmp_path / "old", root=shared)
    with pytest.raises(ConfigError, match=f"checkpoint.dir={shared}"):
        check_start(_cfg(tmp_path / "new", f"checkpoint.dir={shared}"), None, None, overwrite=False, rank=0)


def test_an_empty_or_new_run_dir_and_any_resume_pass(tmp_path):
    check_start(_cfg(tmp_path / "new"), None, None, overwrite=False, rank=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n")
    check_start(_cfg(run), None, None, overwrite=False, rank=0)
    _finished_run(tmp_path / "done")
    check_start(_cfg(tmp_path / "done"), "latest", None, overwrite=False, rank=0)


def test_overwrite_run_deletes_the_old_runs_outputs_and_logs_them(tmp_path, caplog):
    run = tmp_path / "run"
    _finished_run(run)
    (run / "checkpoints" / "notes.txt").write_text("mine")  # not a checkpoint: kept
    with caplog.at_level(logging.WARNING, logger="mmpt.train"):
        check_start(_cfg(run), None, None, overwrite=True, rank=0)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # tokenizer.json: maybe other data's
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["notes.txt"]
    text = caplog.text
    assert "--overwrite-run" in text and str(run / "checkpoints" / "global_step4") in text
    assert str(run / "metrics.jsonl") in text and str(run / "summary.json") in text
    check_start(_cfg(run), None, None, overwrite=False, rank=0)  # now a fresh start passes


def test_overwrite_run_on_other_ranks_deletes_nothing_and_refuses_with_resume(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    check_start(_cfg(run), None, None, overwrite=True, rank=1)
    assert (run / "checkpoints" / "global_step4").is_dir() and (run / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match="--overwrite-run with --resume latest"):
        check_start(_cfg(run), "latest", None, overwrite=True, rank=0)
    assert (run / "checkpoints" / "global_step4").is_dir()


def test_nothing_to_train_reports_the_summary_as_it_was(tmp_path, caplog):
    run = tmp_path / "run"
    root = _finished_run(run)
    summary = (run / "summary.json").read_text()
    cfg = _cfg(run, "train.steps=4")
    assert nothing_to_train(cfg, None, "scratch", root, 0) is None
    assert nothing_to_train(cfg, {"step": 3}, "x", root, 0) is None
    with caplog.at_level(logging.WARNING, logger="mmpt.train"):
        got = nothing_to_train(cfg, {"step": 4}, f"{root}/global_step4", root, 0)
    assert got == {**json.loads(summary), "nothing_to_train": True}
    assert (run / "summary.json").read_text() == summary
    assert "at step 4 and train.steps is 4: nothing to train" in caplog.text
    got = nothing_to_train(_cfg(tmp_path / "other", "train.steps=2"), {"step": 4}, "x", root, 1)
    assert got["nothing_to_train"] and got["start_step"] == 4


def test_overwrite_run_flag_parses_and_passes_through_launch():
    args = parse_args(build_parser(), ["train", "run.dir=/tmp/x", "--overwrite-run"])
    assert args.overwrite_run is True and args.overrides == ["run.dir=/tmp/x"]
    assert parse_args(build_parser(), ["train"]).overwrite_run is False

    from launch import cli as launch_cli

    parser = argparse.ArgumentParser()
    launch_cli.register(parser.add_subparsers(), None, None)  # type: ignore[arg-type]
    args = parser.parse_args(["launch", "--launcher", "torchrun", "--", "train", "--overwrite-run", "a.b=1"])
    assert launch_cli.plan_from_args(args, {}).train_args == ("train", "--overwrite-run", "a.b=1")


def test_overwrite_run_keeps_a_tokenizer_file_the_config_names(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    cfg = _cfg(run)
    cfg.data.tokenizer = str(run / "tokenizer.json")  # the user's input, kept in the run folder
    check_start(cfg, None, None, overwrite=True, rank=0)
    assert (run / "tokenizer.json").read_text() == "{}"


def test_overwrite_run_leaves_hidden_folders_that_are_not_a_saves_staging(tmp_path):
    """checkpoint.dir may be a folder holding other things: only a save's own hidden folders go."""
    run, shared = tmp_path / "run", tmp_path / "shared"
    _finished_run(run, root=shared)
    (shared / ".git").mkdir()
    (shared / ".global_step6.tmp-4321").mkdir()  # a kill's staged copy: a save's own
    check_start(_cfg(run, f"checkpoint.dir={shared}"), None, None, overwrite=True, rank=0)
    assert sorted(p.name for p in shared.iterdir()) == [".git"]


def test_overwrite_run_refuses_to_delete_the_weights_init_from_names(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for init_from in (run, run / "checkpoints" / "global_step4"):
        with pytest.raises(ConfigError, match="--overwrite-run with --init-from"):
            check_start(_cfg(run), None, str(init_from), overwrite=True, rank=0)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing deleted


def test_overwrite_run_deletes_a_fine_tunes_zero_shot_weights_and_wise_ft_sweep(tmp_path):
    """Stale otherwise: a new run without `--wise-ft` (or a pretraining one) would leave the deleted run's
    sweep beside its own outputs."""
    from pretrain.checkpoint.run_dir import RUN_OUTPUTS
    from pretrain.evaluation.wise_ft import RESULT_FILE, ZEROSHOT_FILE

    run = tmp_path / "run"
    _finished_run(run)
    for name in (ZEROSHOT_FILE, RESULT_FILE):
        (run / name).write_text("the old run's")
    check_start(_cfg(run, "train.task=classify", "finetune.classnames=c.txt"), None, None, overwrite=True,
                rank=0)
    assert list(run.iterdir()) == []  # the checkpoints folder too (left empty)
    assert {ZEROSHOT_FILE, RESULT_FILE} <= set(RUN_OUTPUTS)
