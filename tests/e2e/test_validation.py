"""Validation inside a 2-rank ZeRO-3 training job under the real deepspeed launcher (`eval.every`): it
writes val/ metrics at the right steps, keeps the best checkpoint, agrees with `pretrain eval` on the same
weights, and does not change training at all (bit-identical losses with and without it).

`pretrain eval` runs in this process (`pretrain.cli.main`, the CLI's own parsing and output: its program
start, ~2 CPU s of imports, is tested by many other files); training runs as users run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import TINY, cli_json, run_pretrain

from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow
VAL_SAMPLES = 48
TRAIN_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm", "grad_norm", "temperature", "lr")


def deepspeed_train(run_dir: Path, overrides: list[str]) -> None:
    r = run_pretrain(["train", f"run.dir={run_dir}", *TINY, *overrides], procs=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def pretrain_eval(run_dir: Path, shards: dict[str, str]) -> dict:
    """`pretrain eval --json` of `run_dir` on the first VAL_SAMPLES held-out samples, in this process."""
    return cli_json("eval", "--checkpoint", str(run_dir), "--data", shards["val"], "--classnames",
                    shards["classnames"], "--max-samples", str(VAL_SAMPLES), "--json")


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("validation")
    base = [f"data.train={shards['train']}", f"data.val={shards['val']}", "train.steps=6",
            "checkpoint.every=2", "data.workers=1"]
    out = {"plain": d / "plain", "val": d / "val"}
    deepspeed_train(out["plain"], base)
    deepspeed_train(out["val"], [*base, "eval.every=2", f"eval.max_samples={VAL_SAMPLES}",
                                 "checkpoint.keep_last=1", "checkpoint.keep_best=val/i2t_r1"])
    return out


def test_validation_does_not_change_training(runs):
    plain = {r["step"]: r for r in read_metrics(runs["plain"])}
    val = {r["step"]: r for r in read_metrics(runs["val"]) if "loss" in r}
    assert sorted(plain) == sorted(val) == list(range(1, 7))
    for step in plain:
        for k in TRAIN_KEYS:
            assert plain[step][k] == val[step][k], (step, k, plain[step][k], val[step][k])


def test_val_metrics_at_every_validation_step(runs, shards):
    rows = [r for r in read_metrics(runs["val"]) if "val/samples" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["val/samples"] == VAL_SAMPLES
        for k in ("val/loss", "val/loss_contrastive", "val/loss_mim", "val/loss_mlm", "val/zeroshot_top1",
                  "val/zeroshot_top5", "val/i2t_r1", "val/i2t_r5", "val/t2i_r1", "val/t2i_r5", "val/seconds"):
            assert k in r, (k, r)
        assert 0.0 <= r["val/zeroshot_top1"] <= r["val/zeroshot_top5"] <= 1.0
    assert rows[-1]["val/loss"] < rows[0]["val/loss"]  # it is learning, and the metric shows it
    summary = json.loads((runs["val"] / "summary.json").read_text())
    assert 0 < summary["validation_s"] < summary["wall_s"]


def test_tensorboard_has_val_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["val"] / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/zeroshot_top1" in tags and "val/loss" in tags, tags
    assert [e.step for e in acc.Scalars("val/i2t_r1")] == [2, 4, 6]


def test_keep_best_keeps_the_best_checkpoint_beside_the_latest(runs):
    rows = [r for r in read_metrics(runs["val"]) if "val/i2t_r1" in r]
    best_row = max(rows, key=lambda r: (r["val/i2t_r1"], -r["step"]))  # first of equals: strict improvement
    root = runs["val"] / "checkpoints"
    best = json.loads((root / "best.json").read_text())
    assert best["metric"] == "val/i2t_r1" and best["value"] == best_row["val/i2t_r1"]
    assert best["step"] == best_row["step"] and best["tag"] == f"global_step{best_row['step']}"
    kept = sorted(p.name for p in root.glob("global_step*"))
    assert kept == sorted({best["tag"], "global_step6"}), kept  # keep_last=1 plus the best


def test_validation_agrees_with_pretrain_eval_on_the_same_weights(runs, shards):
    last = [r for r in read_metrics(runs["val"]) if "val/samples" in r][-1]
    ev = pretrain_eval(runs["val"], shards)
    assert ev["samples"] == VAL_SAMPLES
    for k in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert ev[k] == last[f"val/{k}"], (k, ev[k], last[f"val/{k}"])


def test_validation_under_tensor_parallelism_agrees_with_pretrain_eval(shards, tmp_path):
    """tp=2: both ranks of the tensor-parallel group read the same share; the live split model's
    validation equals `pretrain eval` on its consolidated checkpoint."""
    run = tmp_path / "tp2"
    deepspeed_train(run, [f"data.train={shards['train']}", f"data.val={shards['val']}", "train.steps=2",
                          "parallel.tp=2", "train.micro_batch=16", "data.workers=1", "eval.at_end=true",
                          f"eval.max_samples={VAL_SAMPLES}"])
    last = [r for r in read_metrics(run) if "val/samples" in r]
    assert [r["step"] for r in last] == [2]
    ev = pretrain_eval(run, shards)
    for k in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
        assert ev[k] == last[0][f"val/{k}"], (k, ev[k], last[0][f"val/{k}"])


@pytest.fixture(scope="module")
def stop_and_resume(shards, tmp_path_factory):
    """One run stopped at a validation step, then its resume stopped at the last step: SIGUSR1 after step 1,
    agreed at step 2 (logging.every=1), and after step 3 in the resume, agreed at step 4 of 4. Two stop
    cases in one run pair (the last-step case was a run of its own: one training process less)."""
    run = tmp_path_factory.mktemp("stop") / "stop"
    args = ["train", f"run.dir={run}", *TINY, f"data.train={shards['train']}", f"data.val={shards['val']}",
            "train.steps=4", "eval.every=2", "checkpoint.every=2", f"eval.max_samples={VAL_SAMPLES}",
            "checkpoint.keep_last=1", "checkpoint.keep_best=val/loss", "data.workers=1"]
    stopped = run_pretrain(args, env={"MMPT_FAULT_SIGNAL": "1"}, timeout=600)
    val_after_stop = [row for row in read_metrics(run) if "val/loss" in row]
    resumed = run_pretrain([*args, "--resume", "latest"], env={"MMPT_FAULT_SIGNAL": "3"}, timeout=600)
    return run, stopped, val_after_stop, resumed


def test_stop_at_a_validation_step_validates_it_after_the_resume(stop_and_resume):
    """A stop request agreed at step 2, a validation step: the run saves and exits 75 without validating
    (stop fast), records `val_pending`, and the resume validates step 2 before training step 3, so val rows
    are at 2 and 4 exactly once and keep_best considered both."""
    run, r, val_after_stop, resumed = stop_and_resume
    assert r.returncode == 75, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stopped at step 2 on" in r.stderr
    assert not val_after_stop
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = read_metrics(run)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    val = [row for row in rows if "val/loss" in row]
    assert [row["step"] for row in val] == [2, 4]
    assert all(row["val/samples"] == VAL_SAMPLES for row in val)
    best_row = min(val, key=lambda row: (row["val/loss"], row["step"]))  # first of equals
    root = run / "checkpoints"
    best = json.loads((root / "best.json").read_text())
    assert (best["value"], best["step"], best["tag"]) == (best_row["val/loss"], best_row["step"],
                                                         f"global_step{best_row['step']}")
    assert (root / best["tag"]).is_dir() and (root / "global_step4").is_dir()


def test_stop_at_the_last_step_still_validates_it(stop_and_resume):
    """A stop request agreed at the last step (the resume's step 4) ends the run normally (exit 0, no
    resume to come), so that step's due validation runs rather than being skipped for good."""
    run, _, _, r = stop_and_resume
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "received SIGUSR1" in r.stderr and "stopped at step" not in r.stderr  # the request came, too late
    val = [row["step"] for row in read_metrics(run) if "val/loss" in row]
    assert val[-1] == 4 and val.count(4) == 1
