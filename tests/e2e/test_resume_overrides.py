"""`pretrain train ... optim.lr=X --resume ...` trains at X: the checkpoint supplies the position (step,
schedule position, Adam moments), this run's config the optimizer's hyper-parameters
(pretrain/checkpoint/hparams.py), at the saved layout (DeepSpeed's own load) and at another one (1 -> 2
ranks, through the universal copy). A 4-step one-process ZeRO-3 run saved at step 2 is resumed with
optim.lr x10: the logged lr rows of steps 3-4 are 10x the original run's, each changed key is logged once,
and the resumed run's own step-4 checkpoint holds the new weight decay / betas in its optimizer groups.
Before, the saved layout kept the checkpoint's lr, weight decay and betas, and the universal path the
checkpoint's lr unless the weight decay changed too.

The saved layout is one process (it was 2 ranks): what is checked happens in every rank's engine alike (the
snapshot and re-application of hparams.py read no rank), and one process costs a fraction of the CPU time
of the launcher and its two ranks; the layout change goes the other way, 1 -> 2, so its universal copy is
still written by rank 0 while rank 1 waits."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import run_pretrain, train_args, write_micro_shards

from pretrain.checkpoint.sources import DeepSpeedSource
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow

BASE = ["optim.lr=2e-3", "optim.weight_decay=0.05", "optim.betas=[0.9,0.98]", "checkpoint.every=2"]


def _train(run: Path, shards: str, procs: int, *extra: str, resume: str | None = None) -> str:
    args = ["train", *train_args(shards, run, 4, *BASE, *extra)] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=procs, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stderr


def _lrs(run: Path) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in read_metrics(run) if "lr" in row}


def _groups(run: Path) -> list[dict]:
    """The optimizer groups the run's step-4 checkpoint saved (rank 0's optimizer file)."""
    src = DeepSpeedSource(run / "checkpoints", "global_step4")
    src.readers  # noqa: B018 - reading them fills meta["param_groups"]
    return src.meta["param_groups"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("resume_overrides")
    shards = write_micro_shards(base / "shards")
    one = "train.micro_batch=8"  # one process; 4 x 2 ranks in the other layout (MICRO's micro_batch)
    _train(base / "straight", shards, 1, one)
    step2 = str(base / "straight" / "checkpoints" / "global_step2")
    out = {"straight": (base / "straight", "")}
    out["same"] = (base / "same", _train(base / "same", shards, 1, one, "optim.lr=2e-2",
                                         "optim.weight_decay=0.5", "optim.betas=[0.5,0.6]", resume=step2))
    # 1 -> 2 ranks (micro_batch x dp kept): through the universal copy; lr and betas changed, weight decay not
    out["other"] = (base / "other", _train(base / "other", shards, 2, "optim.lr=2e-2",
                                           "optim.betas=[0.5,0.6]", resume=step2))
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case, wd", [("same", 0.5), ("other", 0.05)])
def test_resume_trains_at_this_runs_lr_weight_decay_and_betas(runs, case, wd):
    straight, (run, log) = runs["straight"][0], runs[case]
    assert (" through its universal copy " in log) == (case == "other"), log[-3000:]
    a, b = _lrs(straight), _lrs(run)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(10 * a[step], rel=1e-9), (step, a, b)
    assert "optim.lr: checkpoint 0.002 -> this run 0.02" in log, log[-3000:]
    assert "optim.betas: checkpoint [0.9, 0.98] -> this run [0.5, 0.6]" in log, log[-3000:]
    assert ("optim.weight_decay: checkpoint 0.05 -> this run 0.5" in log) == (case == "same"), log[-3000:]
    groups = _groups(run)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, wd]  # the exempt group keeps 0
    for g in groups:
        assert g["betas"] == [0.5, 0.6] and g["initial_lr"] == 2e-2, g
