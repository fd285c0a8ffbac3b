"""`pretrain train --resume` of a DeepSpeed checkpoint at another (dp, tp) needs no ceremony: the trainer
notices the layout change, writes the checkpoint's universal copy once (rank 0; the others wait) or reuses
it, and continues as the run would have at its own layout.

Straight 6-step runs at (dp=2), (dp=1) and (tp=2) save DeepSpeed checkpoints only (no checkpoint.universal)
at step 3; resumed from there at 2 -> 1, 1 -> 2, dp2 -> tp2 and tp2 -> dp2 ranks, steps 4-6 must log the
losses of the straight run (fp32, 1e-4 relative: a missing Adam moment is off by ~1e-2 at step 5) and train
on exactly its samples. `--resume` names the checkpoint as a tag folder, a run directory and `latest`. The
same from ZeRO-2 at dp2 to ZeRO-1 at dp1, whose partitions are cut differently. Global batches are identical
in every layout (tests/layouts.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from layouts import SMALL, keys_by_step, losses, micro_batch, write_layout_data
from tiny import run_pretrain

pytestmark = pytest.mark.slow
STEPS, HALF = 6, 3
TAG = f"global_step{HALF}"
LAYOUTS = {"dp2": (2, 1), "dp1": (1, 1), "tp2": (2, 2)}  # name: (ranks, tp)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return write_layout_data(tmp_path_factory.mktemp("any_layout_data"), STEPS)


def _train(run_dir: Path, layout: str, data: list[str], extra: list[str] = (), resume: str | None = None,
           ok: bool = True):
    ranks, tp = LAYOUTS[layout]
    args = ["train", f"run.dir={run_dir}", *SMALL, *data, f"parallel.tp={tp}", micro_batch(ranks // tp),
            f"train.steps={STEPS}", *extra] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=ranks, timeout=600)
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _only_step3(src: Path, dst: Path) -> Path:
    """A run directory holding just `src`'s step-3 checkpoint (as if the job had died after saving it)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / TAG, dst / "checkpoints" / TAG)
    (dst / "checkpoints" / "latest").write_text(TAG)
    return dst


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, tuple[Path, Path, str, Path]]:
    """case -> (straight run it continues, resumed run, resumed run's log, checkpoint root resumed from);
    in this order, so the second restart from dp2's checkpoint finds the universal copy the first wrote."""
    base = tmp_path_factory.mktemp("any_layout_runs")
    for name in LAYOUTS:
        _train(base / name, name, data, ["checkpoint.every=3"])
        assert not (base / name / "checkpoints" / "universal").exists()
    out: dict = {}
    tag_dir = str(base / "dp2" / "checkpoints" / TAG)
    copy = base / "dp2" / "checkpoints" / "universal" / TAG / "universal.json"
    for case, layout, resume in [("2to1", "dp1", tag_dir),  # a tag folder: converted
                                 ("dp2_to_tp2", "tp2", tag_dir)]:  # the same checkpoint again: reused
        r = _train(base / case, layout, data, resume=resume)
        out[case] = (base / "dp2", base / case, r.stderr, base / "dp2" / "checkpoints")
        out[f"{case}_copy"] = (copy.stat().st_ino, copy.stat().st_mtime_ns)
    src = _only_step3(base / "dp1", base / "dp1_step3")
    r = _train(base / "1to2", "dp2", data, resume=str(src))  # another run's directory
    out["1to2"] = (base / "dp1", base / "1to2", r.stderr, src / "checkpoints")
    run = _only_step3(base / "tp2", base / "tp2_to_dp2")
    r = _train(run, "dp2", data, resume="latest")  # the run's own newest checkpoint
    out["tp2_to_dp2"] = (base / "tp2", run, r.stderr, run / "checkpoints")
    return out


def _assert_continues(straight: Path, resumed: Path) -> None:
    ref, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(HALF + 1, STEPS + 1)), f"{resumed.name} must log steps 4..6"
    for step in got:
        for k, v in ref[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4), (resumed.name, step, k, got[step][k], v)
    keys_ref, keys_got = keys_by_step(straight), keys_by_step(resumed)
    for step in got:
        assert keys_got[step] and keys_got[step] == keys_ref[step], f"{resumed.name}: step {step} samples"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case, was, now", [("2to1", "dp=2 tp=1", "dp=1 tp=1"),
                                            ("1to2", "dp=1 tp=1", "dp=2 tp=1"),
                                            ("dp2_to_tp2", "dp=2 tp=1", "dp=1 tp=2"),
                                            ("tp2_to_dp2", "dp=1 tp=2", "dp=2 tp=1")])
def test_resume_at_another_layout_continues_like_the_original_one(runs, case, was, now):
    straight, resumed, log, root = runs[case]
    _assert_continues(straight, resumed)
    assert f"from layout {was} to {now} (ZeRO 3 -> 3) through its universal copy" in log, log[-3000:]
    assert f"resumed from {root}/universal/{TAG} at step {HALF}" in log, log[-3000:]
    assert (resumed / "checkpoints" / f"global_step{STEPS}").is_dir()  # saved at the new layout as usual


@pytest.mark.timeout(1200)
def test_second_restart_reuses_the_universal_copy(runs):
    first, second = runs["2to1"][2], runs["dp2_to_tp2"][2]
    assert ": converted (" in first and ": reused in " not in first, first[-3000:]
    assert ": reused in " in second and ": converted (" not in second, second[-3000:]
    assert runs["dp2_to_tp2_copy"] == runs["2to1_copy"], "the second restart rewrote the universal copy"


@pytest.mark.timeout(1200)
def test_zero2_checkpoint_resumes_at_another_layout_under_zero1(data, tmp_path):
    """ZeRO 1-2 cut the flattened parameter groups (not each parameter) into DP ranges: read through the
    per-parameter fragment addresses DeepSpeed records (the same weights as its own zero_to_fp32) and
    loaded through those of the new engine; ZeRO-1 does the same math with other gradient buckets."""
    import torch

    from pretrain.checkpoint.atomic import consolidated_state_dict
    from pretrain.checkpoint.sources import open_source

    _train(tmp_path / "dp2", "dp2", data, ["parallel.zero_stage=2", "checkpoint.every=3"])
    root = tmp_path / "dp2" / "checkpoints"
    src, theirs = open_source(root / TAG), consolidated_state_dict(root, TAG)
    assert src.has_optimizer and set(src.names) == set(theirs) and len(theirs) > 20
    for name in src.names:
        assert torch.equal(src.tensor(name), theirs[name]), name
    r = _train(tmp_path / "dp1", "dp1", data, ["parallel.zero_stage=1"], resume=str(root / TAG))
    assert "from layout dp=2 tp=1 to dp=1 tp=1 (ZeRO 2 -> 1)" in r.stderr, r.stderr[-3000:]
    _assert_continues(tmp_path / "dp2", tmp_path / "dp1")


@pytest.mark.timeout(1200)
def test_failed_conversion_stops_every_rank_naming_it(runs, data, tmp_path):
    src = _only_step3(runs["1to2"][0], tmp_path / "src")
    (src / "checkpoints" / "universal").write_text("not a folder")  # rank 0 cannot write the copy
    r = _train(tmp_path / "run", "dp2", data, resume=str(src), ok=False)
    said = "writing the universal copy"  # (the two ranks' lines may interleave)
    assert r.stderr.count(said) == 2 == r.stderr.count(") failed on rank 0: "), r.stderr[-3000:]
    assert "pretrain convert" in r.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
