"""Fault injection: kill -9 of one rank mid-save, a full disk during a save, a write failure on one rank,
a stop signal on one rank, non-finite losses, up-front config validation, safe loading, determinism. Real
training runs; marked slow.

Runs are shared where their faults do not meet (each fixture's docstring says what it holds): the kill -9 run
(crash, mid-save and determinism tests), one 2-rank run with a failed save and then a stop signal (the
write-failure and stop-signal tests), and one run per ZeRO mode with a lone NaN micro-batch and then three in
a row (the skip and patience tests)."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch
from tiny import (
    DEFAULT_PERSISTENCE,
    STRAIGHT,
    STRAIGHT_EVERY,
    STRAIGHT_STEPS,
    TINY,
    run_pretrain,
    straight_2ranks,
)

from data_pipelines.audit import read_keys
from pretrain.checkpoint import atomic as ckpt
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow


def train(shards, run: Path, *extra: str, env=None, procs=1, resume=None, timeout=300):
    args = ["train", f"data.train={shards['train']}", f"run.dir={run}", *TINY, *extra]
    if resume:
        args += ["--resume", resume]
    return run_pretrain(args, env=env, procs=procs, timeout=timeout)


# ------------------------------------------------------------------------------ atomic checkpoints
def test_latest_pointer_lost_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / ckpt.MARKER).write_text("{}")
    (root / "global_step8").mkdir()  # no marker: an interrupted save, never resumed from
    assert ckpt.latest_tag(root) == "global_step6"
    (root / "latest").write_text("global_step8")
    assert ckpt.latest_tag(root) == "global_step6"
    (root / "latest").write_text("global_step4")
    assert ckpt.latest_tag(root) == "global_step4"


def test_retention_keep_last_and_every(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 11):
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / ckpt.MARKER).write_text("{}")
    (root / "latest").write_text("global_step10")
    removed = ckpt.prune(root, keep_last=2, keep_every=4)
    assert ckpt.complete_tags(root) == ["global_step4", "global_step8", "global_step9", "global_step10"]
    assert len(removed) == 6


# ------------------------------------------------------------------------------ crash recovery
@pytest.fixture(scope="module")
def crashed(shards, trained_once, tmp_path_factory) -> dict:
    """A fresh 2-rank run of the shared tiny.straight_2ranks run's arguments (plus parallel.timeout_s=60,
    which does not enter the math), rank 1 killed -9 in its last save before the commit
    (MMPT_FAULT_KILL=save-before-commit:STRAIGHT_STEPS:1), then resumed with `--resume latest`: the results,
    the surviving rank's time to exit, the checkpoints as the kill left them and the rows logged before the
    resume. (A rank dying mid-training: tests/e2e/test_launch_failures.py's dying-rank test.)"""
    straight = straight_2ranks(trained_once, shards)
    run = tmp_path_factory.mktemp("crashed") / "run"
    root = run / "checkpoints"
    common = (*STRAIGHT, "parallel.timeout_s=60")
    t0 = time.monotonic()
    killed = train(shards, run, *common, procs=2,
                   env={"MMPT_FAULT_KILL": f"save-before-commit:{STRAIGHT_STEPS}:1"})
    elapsed = time.monotonic() - t0
    left = {"latest": ckpt.latest_tag(root), "latest_file": (root / "latest").read_text(),
            "published": sorted(p.name for p in root.glob("global_step*")),
            "staged": sorted(p.name for p in (root / ".staging").glob("global_step*"))}
    rows_before_resume = read_metrics(run)
    resumed = train(shards, run, *common, procs=2, resume="latest")
    return {"straight": straight, "run": run, "killed": killed, "elapsed": elapsed, "left": left,
            "rows_before_resume": rows_before_resume, "resumed": resumed}


def test_kill9_one_rank_others_exit_then_resume_matches_straight_run(crashed):
    """Rank 1 killed -9 in the step-STRAIGHT_STEPS save; rank 0 and the launcher exit in time; the run resumes
    from the step-STRAIGHT_EVERY checkpoint and logs the losses of the uninterrupted run of the same
    arguments (the shared tiny.straight_2ranks run). This resume is also the suite's threshold-0 resume check
    (test_train_e2e resumes at the default persistence threshold)."""
    assert crashed["killed"].returncode != 0
    assert crashed["elapsed"] < 150, f"surviving rank took {crashed['elapsed']:.0f}s to exit"
    assert crashed["left"]["latest"] == f"global_step{STRAIGHT_EVERY}"
    r = crashed["resumed"]
    assert r.returncode == 0, r.stderr[-2000:]
    a = {row["step"]: row["loss"] for row in read_metrics(crashed["straight"])}
    rows = [row for row in read_metrics(crashed["run"]) if "loss" in row]
    # every step exactly once: the resume dropped the rows the crashed run logged after its checkpoint
    assert [row["step"] for row in rows] == list(range(1, STRAIGHT_STEPS + 1))
    for row in rows[STRAIGHT_EVERY:]:  # the steps the resumed run trained
        assert row["loss"] == pytest.approx(a[row["step"]], rel=1e-5), row["step"]


def test_kill9_during_save_leaves_previous_checkpoint_and_resume_works(crashed):
    """The crash fixture's kill: that save is left aside in .staging, `latest` names the previous checkpoint,
    which loads, and the resume saves the step again over the leftover (was a one-process run of its own)."""
    left, root = crashed["left"], crashed["run"] / "checkpoints"
    prev, last = f"global_step{STRAIGHT_EVERY}", f"global_step{STRAIGHT_STEPS}"
    assert left["latest_file"] == prev and left["latest"] == prev
    assert left["published"] == [prev]
    assert left["staged"] == [last]  # the half-published save is left aside
    ckpt.consolidated_state_dict(root, prev)  # the previous checkpoint loads
    r = crashed["resumed"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert ckpt.complete_tags(root) == [prev, last]
    assert (root / "latest").read_text() == last
    assert not (root / ".staging" / last).exists()


# ------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # A tiny-model ZeRO-0 fp32 checkpoint is ~3.1 MB: 5 MB holds one and fails the second with ENOSPC.
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_save_is_reported_and_previous_checkpoint_survives(shards, tmp_path, small_fs):
    """ENOSPC in the saves of steps 4 and 6: reported, training goes on, the failed final save stops the run,
    and the step-2 checkpoint stays as saved (every file its marker lists: size, sha256) and loads: a resume
    reads just those (a copy resumed elsewhere, as here before: tests/e2e/test_checkpoint_retention.py)."""
    run = tmp_path / "run"
    root = small_fs / "checkpoints"
    r = train(shards, run, "train.steps=6", "checkpoint.every=2", f"checkpoint.dir={root}",
              "parallel.zero_stage=0", "checkpoint.max_failures=5")
    assert r.returncode != 0  # the final save cannot succeed on a full disk
    assert "No space left on device" in r.stderr
    assert "previous checkpoint (global_step2) is intact" in r.stderr
    assert ckpt.complete_tags(root) == ["global_step2"]
    assert (root / "latest").read_text() == "global_step2"
    assert not any((root / ".staging").glob("global_step*"))  # partial writes cleaned up
    steps = [row["step"] for row in read_metrics(run) if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # training went on from memory after the failed save at step 4
    failures = [row for row in read_metrics(run) if "checkpoint_failed" in row]
    assert [row["step"] for row in failures] == [4, 6]

    ckpt.verify_marker(root / "global_step2")  # every file of the survivor as saved (size, sha256)
    assert ckpt.read_client_state(root)["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.consolidated_state_dict(root).values())


# ------------------------------------------------------------------------------ one rank's failed save
# 2 ranks at the default persistence threshold, where DeepSpeed's save_checkpoint runs collectives (the
# all_gather of persistent parameters, a barrier) after the file writes: a write failing on rank 1 must
# neither leave rank 1 out of them nor make any rank wait for parallel.timeout_s.
TIMEOUT_S = 60
ONE_RANK_FAILS = (DEFAULT_PERSISTENCE, "train.steps=6", "checkpoint.every=2",
                  f"parallel.timeout_s={TIMEOUT_S}")


def _logged_at(stderr: str, needle: str) -> float:
    """Wall-clock time of the first log line containing `needle` (the trainer's `%(asctime)s` prefix)."""
    for line in stderr.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if m and needle in line:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line with {needle!r}:\n{stderr[-3000:]}")


@pytest.fixture(scope="module")
def failed_save_then_stop(shards, tmp_path_factory) -> dict:
    """2 ranks, default threshold, 8 steps, checkpoint.every=2, logging.every=5, max_failures=3, two faults on
    rank 1 that do not meet: its writes fail in the step-4 save, and it alone gets SIGUSR1 after step 3. Both
    ranks report the failed save and train on; the stop is agreed at the next log step, 5, where both save
    global_step5 and exit 75. The write-failure and stop-signal tests read it (each had a run of its own)."""
    run = tmp_path_factory.mktemp("failed_save") / "run"
    r = train(shards, run, DEFAULT_PERSISTENCE, "train.steps=8", "checkpoint.every=2", "logging.every=5",
              f"parallel.timeout_s={TIMEOUT_S}", "checkpoint.max_failures=3", procs=2,
              env={"MMPT_FAULT_WRITE": "4:1", "MMPT_FAULT_SIGNAL": "3:1"})
    return {"run": run, "r": r}


def test_write_failure_on_one_rank_is_reported_by_every_rank_and_training_goes_on(failed_save_then_stop):
    r, run = failed_save_then_stop["r"], failed_save_then_stop["run"]
    assert r.returncode == 75, r.stderr[-3000:]  # the stop request's exit (the stop-signal test)
    failed = "saving checkpoint global_step4 under"
    t_fail = _logged_at(r.stderr, "rank 1: writing")  # the injected error, when rank 1 hit it
    for rank in (0, 1):  # both ranks report it, naming rank 1, within seconds (a hang would take 60 s)
        t = _logged_at(r.stderr, f"rank {rank}: {failed}")
        assert t - t_fail < TIMEOUT_S / 4, f"rank {rank} reported the failed save {t - t_fail:.0f}s late"
    assert re.search(r"rank 0: saving checkpoint global_step4 .* failed on rank 1: .*injected write failure",
                     r.stderr)
    rows = read_metrics(run)
    assert [row["step"] for row in rows if "loss" in row] == [5]  # went on from memory (logging.every=5)
    fails = [row for row in rows if "checkpoint_failed" in row]
    assert [row["step"] for row in fails] == [4] and "failed on rank 1" in fails[0]["checkpoint_failed"]
    root = run / "checkpoints"
    assert ckpt.complete_tags(root) == ["global_step2", "global_step5"]  # the next save succeeded
    assert (root / "latest").read_text() == "global_step5"
    assert not (root / ".staging" / "global_step4").exists()
    assert ckpt.read_client_state(root)["step"] == 5


def test_write_failure_on_one_rank_stops_every_rank_promptly(shards, tmp_path):
    """max_failures=1 stops at the first failed save: every rank exits nonzero with the error, seconds after
    it (not after parallel.timeout_s). A failed final save takes the same `raise` on every rank (`final or
    save_failures >= ...`, pretrain/train.py), the full-disk test's with one rank (a 2-rank case was cut)."""
    run = tmp_path / "run"
    r = train(shards, run, *ONE_RANK_FAILS, "checkpoint.max_failures=1", procs=2,
              env={"MMPT_FAULT_WRITE": "4:1"})
    ended = time.time()
    assert r.returncode != 0
    t_fail = _logged_at(r.stderr, "rank 1: writing")
    assert ended - t_fail < TIMEOUT_S / 2, f"the job exited {ended - t_fail:.0f}s after the failed write"
    for rank in (0, 1):
        assert re.search(rf"pretrain: error on rank {rank}: saving checkpoint global_step4 .* failed on "
                         r"rank 1: .*injected write failure", r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert [row["step"] for row in read_metrics(run) if "loss" in row] == [1, 2, 3, 4]
    root = run / "checkpoints"
    assert ckpt.latest_tag(root) == "global_step2"  # the previous checkpoint is what remains
    assert not (root / ".staging" / "global_step4").exists()


# ------------------------------------------------------------------------------ non-finite steps
# ZeRO stage -> objective made NaN, steps trained, nonfinite_skipped per logged step, step the patience stops
NONFINITE = {3: ("mim", [1, 2, 4], {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}, 7),
             0: ("mlm", [1, 2, 3], {1: 0, 2: 0, 3: 1}, 4)}


@pytest.fixture(scope="module", params=[3, 0], ids=["zero3", "zero0"])
def nonfinite_run(request, shards, tmp_path_factory) -> dict:
    """Micro-batches 3, 5, 6, 7 NaN (one objective), nonfinite_patience=3, 8 steps; read by the skip and
    patience tests (each ran its own per stage). ZeRO 1-3 (deferred guard, no read in a healthy step): a NaN
    micro-batch's gradients are made non-finite, DeepSpeed skips its step, the flags are read at the log
    step: 3 skipped, 4 trained (the count restarts), 5-7 skipped, stop at 7. ZeRO 0 (synchronous guard): a
    NaN micro-batch is dropped before backward and replaced by the next: 4 trains step 3, 5-7 are dropped in
    step 4, which stops."""
    zero, run = request.param, tmp_path_factory.mktemp(f"nonfinite{request.param}") / "run"
    r = train(shards, run, "train.steps=8", "data.log_keys=true", f"parallel.zero_stage={zero}",
              "train.nonfinite_patience=3", env={"MMPT_FAULT_NONFINITE": f"{NONFINITE[zero][0]}:3,5,6,7"})
    return {"zero": zero, "run": run, "r": r}


def test_nonfinite_loss_is_skipped_and_counted(nonfinite_run):
    """The lone NaN micro-batch (3) is skipped (ZeRO 3: with its optimizer step; ZeRO 0: replaced), counted
    once, named, kept out of the weights (the next step trains to a finite loss) and out of the key audit."""
    zero, run, r = nonfinite_run["zero"], nonfinite_run["run"], nonfinite_run["r"]
    objective, trained, counted, stop = NONFINITE[zero]
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, stop)), r.stderr[-2000:]  # up to the stop
    assert {row["step"]: row["nonfinite_skipped"] for row in rows} == counted
    assert f"step 3: non-finite loss_{objective}" in r.stderr
    # the key audit lists exactly what was trained (ZeRO 3: a skipped step's samples are not audited)
    audited = Counter(rec.step for rec in read_keys(run))
    assert sorted(audited.items()) == [(s, 8) for s in trained]
    assert [row["step"] for row in rows if "loss" in row] == trained  # skipped steps log no loss
    assert all(row.get("loss", 0) == row.get("loss", 0) for row in rows)  # no NaN in the weights or logs


def test_nonfinite_patience_stops_naming_step_and_objective(nonfinite_run):
    """Micro-batches 5, 6, 7 are NaN, after the lone one at 3 and a clean micro-batch. ZeRO 3 skips steps 5,
    6 and 7 and stops at step 7 (the third in a row); ZeRO 0 replaces them inside step 4 and stops there."""
    r, (objective, _, _, stop) = nonfinite_run["r"], NONFINITE[nonfinite_run["zero"]]
    assert r.returncode != 0
    assert f"stopping at step {stop}: non-finite loss_{objective} in 3 micro-batches in a row" in r.stderr


# ------------------------------------------------------------------------------ validation up front
def test_all_config_problems_listed_before_any_process_group(tmp_path):
    # WORLD_SIZE=2 with no peer would block in the rendezvous; validation must fail first, at once.
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    t0 = time.monotonic()
    r = run_pretrain(["train", "data.train=/nonexistent/{0..3}.tar", f"run.dir={tmp_path}",
                      "model.vision.heads=5", "train.global_batch=100", "train.micro_batch=8",
                      "objectives.mim.mask_ratio=1.5"], env=env, timeout=120)
    assert r.returncode == 2
    assert "DeepSpeed" not in r.stderr and time.monotonic() - t0 < 60
    for needle in ("model.vision.heads (5) must divide", "train.global_batch (100) != train.micro_batch (8)",
                   "objectives.mim.mask_ratio must be in [0, 1)"):
        assert needle in r.stderr, r.stderr[-2000:]


@pytest.fixture
def own_stop_handlers():
    """train() keeps its stop-signal handlers when it refuses to start (its process exits then)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}  # launch.signals.STOP_SIGNALS
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_missing_training_data_is_named_before_any_process_group(tmp_path, capsys, monkeypatch,
                                                                  own_stop_handlers):
    """In this process (`pretrain.cli.main`; the program's own exit 2 before any process group, and before
    DeepSpeed says anything: the test above): starting a process group would fail the test."""
    from parallel import groups
    from pretrain.cli import main

    monkeypatch.setattr(groups, "init_distributed", lambda *a, **k: pytest.fail("process group started"))
    t0 = time.monotonic()
    assert main(["train", f"run.dir={tmp_path}"]) == 2  # demo.yaml leaves data.train empty
    assert "data.train is empty" in capsys.readouterr().err
    assert time.monotonic() - t0 < 60


def test_eval_of_a_missing_checkpoint_names_the_path(tmp_path, capsys):
    """In this process (`pretrain.cli.main`): `pretrain eval`'s own start and exit codes are run as programs
    in tests/e2e/test_finetune.py, test_distributed_eval.py and test_no_unpickling.py."""
    from pretrain.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", "x", "--classnames", "y"]) == 2
    assert f"no DeepSpeed checkpoint at {tmp_path / 'nope'}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ safety
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmpt-pwned",))


def test_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    tag = root / "global_step1"
    tag.mkdir(parents=True)
    with open(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", "wb") as fh:
        pickle.dump({"mmpt": _Exploit()}, fh)
    (tag / ckpt.MARKER).write_text("{}")
    (root / "latest").write_text("global_step1")
    Path("/tmp/mmpt-pwned").unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_client_state(root)
    assert not Path("/tmp/mmpt-pwned").exists()


def test_no_unsafe_loading_in_the_code():
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for py in [*root.glob("pretrain/**/*.py"), *root.glob("data_pipelines/**/*.py"),
               *root.glob("parallel/**/*.py"), *root.glob("launch/**/*.py")]:
        text = py.read_text()
        for bad in (r"weights_only\s*=\s*False", r"yaml\.load\(", r"yaml\.unsafe_load", r"(?<![.\w])eval\(",
                    r"(?<![.\w])exec\(", r"pickle\.loads?\("):
            if re.search(bad, text):
                offenders.append(f"{py.relative_to(root)}: {bad}")
        if "torch.load(" in text and py.relative_to(root).as_posix() != "pretrain/checkpoint/atomic.py":
            offenders.append(f"{py.relative_to(root)}: torch.load outside pretrain/checkpoint/atomic.py")
    assert not offenders


def test_safe_loader_still_reads_real_deepspeed_files(shards, tmp_path):
    run = tmp_path / "run"
    r = train(shards, run, "train.steps=2", "train.precision=fp16")
    if r.returncode != 0 and "fp16" in r.stderr and "not supported" in r.stderr:
        pytest.skip("fp16 not supported by DeepSpeed's CPU accelerator")
    assert r.returncode == 0, r.stderr[-2000:]
    state = ckpt.read_client_state(run / "checkpoints")
    assert state["step"] == 2
    sd = ckpt.consolidated_state_dict(run / "checkpoints")
    assert all(torch.isfinite(v).all() for v in sd.values())


# ------------------------------------------------------------------------------ determinism
LOSS_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm")


def test_same_config_seed_and_layout_give_bit_identical_losses(crashed):
    """Two separate launches of the same config, seed and layout (2 ranks, ZeRO-3): the crash test's fresh
    run, up to its kill in the save of its last step, and the shared straight run log the same losses,
    exactly (no approx)."""
    before = [row for row in crashed["rows_before_resume"] if "loss" in row]
    assert [row["step"] for row in before] == list(range(1, STRAIGHT_STEPS + 1))
    straight = {row["step"]: row for row in read_metrics(crashed["straight"])}
    for row in before:
        assert {k: row[k] for k in LOSS_KEYS} == {k: straight[row["step"]][k] for k in LOSS_KEYS}, row["step"]


# ------------------------------------------------------------------------------ preemption
def test_stop_signal_on_one_rank_stops_every_rank_at_the_next_log_step(failed_save_then_stop):
    """SIGUSR1 reaches rank 1 only, after step 3; the request is agreed at log steps (logging.every=5), not
    at the save of step 4 in between (which failed on rank 1: the write-failure test), so both ranks stop
    after step 5, save global_step5 and exit 75 (for a requeued job to resume)."""
    r, run = failed_save_then_stop["r"], failed_save_then_stop["run"]
    assert r.returncode == 75, r.stderr[-3000:]
    assert "stopped at step 5 on" in r.stderr
    assert ckpt.latest_tag(run / "checkpoints") == "global_step5"
    assert [row["step"] for row in read_metrics(run) if "loss" in row] == [5]
