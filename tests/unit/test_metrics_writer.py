"""RUN_DIR/metrics.jsonl: strict JSON (non-finite values as null) and every step once after a resume, in
the file and in TensorBoard."""

from __future__ import annotations

import json
import math

from pretrain.metrics import MetricsWriter, read_metrics, truncate_after


def _steps(run_dir) -> list[tuple[int, str]]:
    return [(r["step"], "val" if "val/loss" in r else "train") for r in read_metrics(run_dir)]


def test_non_finite_values_are_written_as_null(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    nested = {"x": -math.inf, "y": [1.0, math.nan]}
    w.log(2, {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "nested": nested})
    w.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    row = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict parse
    assert row["loss"] is None and row["grad_norm"] is None and row["lr"] == 1e-3
    assert row["nested"] == {"x": None, "y": [1.0, None]}
    assert "NaN" not in line and "Infinity" not in line


def test_resume_drops_rows_after_its_step_and_keeps_validation_rows(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):  # a run that checkpointed at 3 and was killed after logging 5
        w.log(step, {"loss": float(step)})
        if step in (2, 4):
            w.log(step, {"val/loss": 9.0})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "loss": 1.')  # the kill cut the last line short
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    for step in (4, 5, 6):
        w.log(step, {"loss": 10.0 + step})
    w.close()
    assert _steps(tmp_path) == [(1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train"),
                                (5, "train"), (6, "train")]
    assert [r["loss"] for r in read_metrics(tmp_path) if "loss" in r] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))


def test_truncate_leaves_a_file_with_nothing_to_drop_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert truncate_after(path, 2) == 0
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert truncate_after(path, 0) == 2 and path.read_text() == ""  # `--resume latest` found no checkpoint
    assert truncate_after(tmp_path / "absent.jsonl", 0) == 0


def test_tensorboard_purges_the_steps_a_resume_logs_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        w.log(step, {"loss": float(step)})
    w.close()
    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=3)
    for step in (4, 5):
        w.log(step, {"loss": 10.0 + step})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def test_a_resume_that_runs_a_skipped_validation_again_drops_an_earlier_catch_up_row(tmp_path):
    """A stop skipped step 2's validation (val_pending in the checkpoint); a resume ran it, logged its row
    at step 2 and was killed before the next checkpoint: the next resume from step 2 runs it again, so that
    row goes (once, not twice), while step 2's training row stays."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "val/loss": 2.7},
            {"step": 3, "loss": 2.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2, val_pending=True)
    w.close()
    assert [(r["step"], "val/loss" in r) for r in read_metrics(tmp_path)] == [(1, False), (2, False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert truncate_after(path, 2) == 1  # an ordinary resume keeps step 2's validation row


def test_rows_a_resume_takes_out_are_kept_beside_the_file(tmp_path):
    """`--resume latest` that finds no checkpoint (a wrong checkpoint.dir) starts at step 0 and takes every
    row out: they go to metrics.dropped.jsonl, never away."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("".join(r + "\n" for r in rows))
    assert truncate_after(path, 0) == 3
    assert path.read_text() == "" and (tmp_path / "metrics.dropped.jsonl").read_text().splitlines() == rows
