"""End-to-end: shards -> 2-rank ZeRO-3 training under the real deepspeed launcher -> checkpoint -> resume
-> eval. Small enough for 2 CPU cores; marked slow.

`pretrain eval` and the refused fresh start run in this process (`pretrain.cli.main`): the programs' own
start and exit codes are tested elsewhere (named at each). One run on another tool's shards serves the
shards test and the finished-run-dir test."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import (
    DEFAULT_PERSISTENCE,
    TINY,
    cli_json,
    logged_steps,
    persistent_params,
    run_pretrain,
    straight_2ranks,
    train_args,
)

from pretrain.checkpoint import atomic as ckpt
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow


def deepspeed_train(run_dir: Path, overrides: list[str], procs: int = 2, resume: str | None = None):
    args = ["train", f"run.dir={run_dir}", *TINY, *overrides] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=procs, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def straight_run(shards, trained_once) -> Path:
    """The session's shared 2-rank run (tiny.STRAIGHT: 16 steps, checkpoints at 8 and 16)."""
    return straight_2ranks(trained_once, shards)


@pytest.fixture(scope="module")
def straight_run_default(shards, tmp_path_factory) -> Path:
    """The same run at the default persistence threshold: ZeRO-3 keeps the small parameters whole."""
    run = tmp_path_factory.mktemp("straight_default") / "run"
    deepspeed_train(run, [f"data.train={shards['train']}", "train.steps=16", "checkpoint.every=8",
                          DEFAULT_PERSISTENCE])
    assert persistent_params(run) > 0
    return run


def test_two_rank_zero3_loss_falls(straight_run):
    rows = read_metrics(straight_run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first = np.mean([r["loss"] for r in rows[:4]])
    last = np.mean([r["loss"] for r in rows[-4:]])
    assert last < first * 0.9, (first, last)
    for key in ("loss_contrastive", "loss_mim", "loss_mlm", "lr", "temperature", "grad_norm",
                "samples_per_s", "data_wait_frac"):
        assert key in rows[-1], key
    assert all(np.isfinite(r["loss"]) for r in rows)
    # `lr` is the rate each step trained with (TINY: optim.lr 2e-3, 2 warm-up steps): half at step 1
    assert [r["lr"] for r in rows[:2]] == pytest.approx([1e-3, 2e-3])


def test_checkpoint_is_standard_deepspeed_zero3(straight_run):
    ck = straight_run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "global_step16"
    for step in (8, 16):
        tag = ck / f"global_step{step}"
        for r in (0, 1):
            assert (tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()
            assert (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()


def test_tensorboard_has_each_objective(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ("loss/loss_contrastive", "loss/loss_mim", "loss/loss_mlm", "loss/loss"):
        assert t in tags, tags
    assert len(acc.Scalars("loss/loss_mim")) == 16


def test_resume_matches_uninterrupted_run(straight_run, straight_run_default, shards, tmp_path):
    """Resume from the step-8 checkpoint of the straight run trained at the default persistence threshold
    (ZeRO-3 keeps the small parameters whole): steps 9..16 give its losses, and its 16 losses equal the
    threshold-0 run's (every parameter partitioned). The threshold-0 resume is test_reliability.py's kill -9
    test (what a second case here did): it resumes a crashed run of the shared straight run's arguments
    from its step-8 checkpoint and compares steps 9..16 with the straight run (rel 1e-5)."""
    run = tmp_path / "resumed"
    tag = "checkpoints/global_step8"
    shutil.copytree(straight_run_default / tag, run / tag)
    (run / "checkpoints" / "latest").write_text("global_step8")
    deepspeed_train(run, [f"data.train={shards['train']}", "train.steps=16", "checkpoint.every=8",
                          DEFAULT_PERSISTENCE], resume="latest")
    a, b = losses(straight_run_default), losses(run)
    assert sorted(b) == list(range(9, 17))
    for step in range(9, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    ref = losses(straight_run)  # persistence changes where parameters live, not the math
    for step, value in a.items():
        assert value == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, ref[step], value)


def test_eval_reports_zero_shot_and_retrieval(straight_run, shards):
    """In this process (`cli_json`): `pretrain eval` runs as a program in tests/e2e/test_finetune.py,
    test_distributed_eval.py and test_no_unpickling.py."""
    out = cli_json("eval", "--checkpoint", str(straight_run), "--data", shards["val"], "--classnames",
                   shards["classnames"], "--json")
    for key in ("zeroshot_top1", "zeroshot_top5", "chance", "i2t_r1", "t2i_r1"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["samples"] == 128
    assert out["zeroshot_top5"] >= out["zeroshot_top1"]


def _write_foreign_shards(d: Path, n_shards: int = 4, per_shard: int = 16) -> str:
    """Shards as another tool writes them: plain tarfile, only .jpg/.txt/.cls, no sizes.json."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(d / f"part-{s}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"img{s:02d}{i:03d}"
                colour = ["red", "green", "blue"][i % 3]
                arr = np.zeros((40, 48, 3), np.uint8)
                arr[..., i % 3] = 200 + rng.integers(0, 50)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a {colour} square".encode()),
                                  ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{d}/part-{{0..{n_shards - 1}}}.tar"


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory) -> dict:
    """`pretrain train` (the program) on shards written by another tool (`_write_foreign_shards`): the
    finished-run-dir test's first run (tiny.MICRO, 3 steps, a checkpoint each, warm-up 2 steps to lr 1e-3,
    one loader worker), and what it logged and left, as the shards test reads it (the other test then reruns
    into the same folder)."""
    base = tmp_path_factory.mktemp("foreign")
    urls, run = _write_foreign_shards(base / "foreign"), base / "run"
    args = ["train", *train_args(urls, run, 3, "data.workers=1", "optim.warmup_steps=2", "optim.lr=1e-3",
                                 "checkpoint.every=1")]
    r = run_pretrain(args)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"args": args, "run": run, "rows": read_metrics(run),
            "latest": (run / "checkpoints" / "latest").is_file(),
            "files": {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}}


def test_trains_on_shards_written_by_other_tools(foreign_run):
    rows = foreign_run["rows"]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[-1]["skipped"] == 0
    assert foreign_run["latest"]


def test_rerun_into_a_finished_run_dir_refuses_resumes_to_nothing_or_starts_over(foreign_run, capsys):
    """A second fresh start into a run.dir with a finished run is refused and touches nothing (in this
    process: `pretrain.cli.main`; its exit 2 is the program's, e.g. test_reliability's config-error test);
    the same command with `--resume latest` has nothing to train and leaves summary.json as it was;
    --overwrite-run starts over with the old checkpoints and rows gone. The `lr` rows are the rates the
    steps used."""
    from pretrain.cli import main

    args, run, files = foreign_run["args"], foreign_run["run"], foreign_run["files"]
    assert [row["lr"] for row in foreign_run["rows"]] == pytest.approx([5e-4, 1e-3, 1e-3])  # 1/2, 2/2, cos(0)
    root = run / "checkpoints"

    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"run.dir={run} already holds a run" in err and "--resume latest" in err
    assert "--overwrite-run" in err and "Traceback" not in err
    r = run_pretrain([*args, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is at step 3 and train.steps is 3: nothing to train" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["nothing_to_train"] is True
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files  # all untouched

    r = run_pretrain([*args[:-1], "checkpoint.every=2", "train.steps=2", "--overwrite-run"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite-run" in r.stderr and str(root / "global_step3") in r.stderr
    assert logged_steps(run) == [1, 2] and ckpt.complete_tags(root) == ["global_step2"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
