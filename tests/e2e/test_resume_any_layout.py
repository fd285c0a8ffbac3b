"""`pretrain train --resume` of a DeepSpeed checkpoint at another (dp, tp) needs no ceremony: the trainer
notices the layout change, writes the checkpoint's universal copy once (rank 0; the others wait) or reuses
it, and continues as the run would have at its own layout.

The reference run (dp=2, 9 steps, tests/layouts.py) saved at step 3; that checkpoint's DeepSpeed files alone
(no universal copy) resume at 2 -> 1 ranks (the copy written) and dp2 -> tp2 (the copy reused; no
data.tokenizer: the checkpoint's own). The tp2 run's step-6 checkpoint (DeepSpeed files only: training
writes no universal copy unless asked) resumes in turn at tp2 -> dp2 ranks. Every resumed run must log the
reference run's losses up to step 9 (fp32, 1e-4 relative; the LR schedule spans train.steps, the same in
every run) and train on exactly its samples. `--resume` names the checkpoint as a tag folder, another run's
directory and `latest`. The same from ZeRO-2 at dp2 to ZeRO-1 at dp1, whose partitions are cut differently
(saved at step 2 of 4, two steps on: where a lost Adam moment shows).
Global batches are identical in every layout.

No 1 -> 2 case: it takes the paths tp2 -> dp2 takes. Its loader is tp2 -> dp2's (dp=2 tp=1 ZeRO-3 from a
universal copy, one data stream re-dealt to two), and its reader, a one-rank ZeRO-3 checkpoint, is the tp2
checkpoint's per TP rank (dp=1 each) and that of tests/e2e/test_checkpoint_retention.py, whose one-rank
runs save universal copies and resume from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from layouts import EVERY, STEPS, assert_continues, only_checkpoint, tag, train

pytestmark = pytest.mark.slow


@dataclass
class Resumed:
    run: Path  # the resumed run
    log: str  # its stderr
    root: Path  # the checkpoint root it resumed from
    start: int  # the step it resumed at


@pytest.fixture(scope="module")
def runs(layout_data, layout_straight, tmp_path_factory) -> dict:
    """case -> Resumed, in this order: the second restart from the step-3 checkpoint finds the universal copy
    the first wrote; the last resumes the checkpoint the second saved at step 6."""
    base = tmp_path_factory.mktemp("any_layout_runs")
    src = only_checkpoint(layout_straight, EVERY, base / "dp2_step3")
    out: dict = {"copy": src / "checkpoints" / "universal" / tag(EVERY)}
    for case, ranks, tp, data, resume in [
            ("2to1", 1, 1, layout_data, src / "checkpoints" / tag(EVERY)),  # a tag folder: converted
            ("dp2_to_tp2", 2, 2, layout_data[:1], src)]:  # the same one, as another run's directory: reused
        r = train(base / case, data, ranks, tp, extra=[f"checkpoint.every={EVERY}"], resume=str(resume))
        out[case] = Resumed(base / case, r.stderr, src / "checkpoints", EVERY)
        meta = out["copy"] / "universal.json"
        out[f"{case}_copy"] = (meta.stat().st_ino, meta.stat().st_mtime_ns)
        assert not (base / case / "checkpoints" / "universal").exists()  # DeepSpeed files only by default
    # no data.tokenizer: the resumed run must take the checkpoint's own
    tokenizer = (base / "dp2_to_tp2" / "tokenizer.json").read_text()
    assert tokenizer == (layout_straight / "tokenizer.json").read_text()
    run = only_checkpoint(base / "dp2_to_tp2", 2 * EVERY, base / "tp2_to_dp2")
    r = train(run, layout_data, 2, resume="latest")  # the run's own newest checkpoint
    out["tp2_to_dp2"] = Resumed(run, r.stderr, run / "checkpoints", 2 * EVERY)
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case, was, now", [("2to1", "dp=2 tp=1", "dp=1 tp=1"),
                                            ("dp2_to_tp2", "dp=2 tp=1", "dp=1 tp=2"),
                                            ("tp2_to_dp2", "dp=1 tp=2", "dp=2 tp=1")])
def test_resume_at_another_layout_continues_like_the_original_one(runs, layout_straight, case, was, now):
    got, log = runs[case], runs[case].log
    assert_continues(layout_straight, got.run, got.start, STEPS)
    assert f"from layout {was} to {now} (ZeRO 3 -> 3) through its universal copy" in log, log[-3000:]
    assert f"resumed from {got.root}/universal/{tag(got.start)} at step {got.start}" in log, log[-3000:]
    assert (got.run / "checkpoints" / tag(STEPS)).is_dir()  # saved at the new layout as usual


@pytest.mark.timeout(1200)
def test_second_restart_reuses_the_universal_copy(runs):
    first, second = runs["2to1"].log, runs["dp2_to_tp2"].log
    assert ": converted (" in first and ": reused in " not in first, first[-3000:]
    assert ": reused in " in second and ": converted (" not in second, second[-3000:]
    assert runs["dp2_to_tp2_copy"] == runs["2to1_copy"], "the second restart rewrote the universal copy"


@pytest.mark.timeout(1200)
def test_copy_written_on_resume_equals_the_checkpoint_universal_save(runs, layout_straight):
    """The copy a resume writes is the one `checkpoint.universal=true` saved with the checkpoint."""
    from pretrain.checkpoint.sources import open_source

    direct = open_source(layout_straight / "checkpoints" / "universal" / tag(EVERY))
    converted = open_source(runs["copy"])
    assert direct.names == converted.names and len(direct.names) > 20
    for name in direct.names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(direct.tensor(name, key), converted.tensor(name, key)), (name, key)


@pytest.mark.timeout(1200)
def test_zero2_checkpoint_resumes_at_another_layout_under_zero1(layout_data, tmp_path):
    """ZeRO 1-2 cut the flattened parameter groups (not each parameter) into DP ranges: read through the
    per-parameter fragment addresses DeepSpeed records (the same weights as its own zero_to_fp32) and
    loaded through those of the new engine; ZeRO-1 does the same math with other gradient buckets."""
    from pretrain.checkpoint.atomic import consolidated_state_dict
    from pretrain.checkpoint.sources import open_source

    steps, at = 4, 2  # two steps on from the checkpoint, where a lost Adam moment shows (layouts.py)
    train(tmp_path / "dp2", layout_data, 2, steps=steps,
          extra=["parallel.zero_stage=2", f"checkpoint.every={at}"])
    root = tmp_path / "dp2" / "checkpoints"
    src, theirs = open_source(root / tag(at)), consolidated_state_dict(root, tag(at))
    assert src.has_optimizer and set(src.names) == set(theirs) and len(theirs) > 20
    for name in src.names:
        assert torch.equal(src.tensor(name), theirs[name]), name
    r = train(tmp_path / "dp1", layout_data, 1, steps=steps, extra=["parallel.zero_stage=1"],
              resume=str(root / tag(at)))
    assert "from layout dp=2 tp=1 to dp=1 tp=1 (ZeRO 2 -> 1)" in r.stderr, r.stderr[-3000:]
    assert_continues(tmp_path / "dp2", tmp_path / "dp1", at, steps)


@pytest.mark.timeout(1200)
def test_failed_conversion_stops_every_rank_naming_it(runs, layout_data, tmp_path):
    src = only_checkpoint(runs["2to1"].run, 2 * EVERY, tmp_path / "src")  # saved at (dp=1)
    (src / "checkpoints" / "universal").write_text("not a folder")  # rank 0 cannot write the copy
    r = train(tmp_path / "run", layout_data, 2, resume=str(src), ok=False)
    said = "writing the universal copy"  # (the two ranks' lines may interleave)
    assert r.stderr.count(said) == 2 == r.stderr.count(") failed on rank 0: "), r.stderr[-3000:]
    assert "pretrain convert" in r.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
