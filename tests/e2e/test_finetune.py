"""`pretrain finetune --task classify` end to end: a tiny model pretrained for 5 steps on synthetic shards,
then fine-tuned for 40 on 2 ranks under the real deepspeed launcher (ZeRO-3) with validation and a WiSE-FT
sweep. Fine-tuned top-1 on the held-out shards must beat the init's zero-shot top-1 by MARGIN; the sweep's
ends must equal, alpha=0, the init's zero-shot accuracy under `pretrain eval` and, alpha=1, the run's last
validation (the live ZeRO-3 model) -- both computed by other code paths than the sweep's; `pretrain eval`
of the fine-tuned checkpoint reports that validation's accuracy too.

Steps: the init's zero-shot top-1 on the 128 held-out samples is chance (3/128; 1/32 is 4) after 5
pretraining steps, as it was (4/128) after 40. Fine-tuned for 40 steps (2 ranks x 16) from the 5-step init
it is 23/128 (20/128 after 80 steps from a 40-step init, as this test ran before). MARGIN is 8 samples, 4
binomial sd of chance: the same run trained on shuffled labels ends at 8/128 and fails it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import TINY, cli_json, run_pretrain

from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PRE_STEPS, FT_STEPS, EVAL_EVERY = 5, 40, 20
MARGIN = 8 / 128  # of top-1 over the init's zero-shot: 4 binomial sd of chance (1/32) on the 128 samples


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("finetune")
    pre, ft = d / "pre", d / "ft"
    r = run_pretrain(["train", *TINY, f"data.train={shards['train']}", f"run.dir={pre}",
                      f"train.steps={PRE_STEPS}", "logging.tensorboard=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_pretrain(["finetune", *TINY, "--task", "classify", "--train", shards["train"],
                      "--val", shards["val"], "--classnames", shards["classnames"], "--init-from", str(pre),
                      f"run.dir={ft}",
                      f"train.steps={FT_STEPS}", "train.micro_batch=16", "optim.warmup_steps=5",
                      f"eval.every={EVAL_EVERY}", "data.workers=1", "--wise-ft", *map(str, ALPHAS)],
                     procs=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = next(line for line in reversed(r.stdout.splitlines()) if line.startswith('{"steps"'))
    summary = json.loads(last)
    return {"pre": pre, "ft": ft, "summary": summary, "stderr": r.stderr}


@pytest.fixture(scope="module")
def zeroshot(runs, shards) -> dict:
    """`pretrain eval` of the init on the held-out shards (its prompts: the templates file beside them), in
    this process (`pretrain.cli.main`: no second program start; the CLI path of a fine-tune's eval is
    test_pretrain_eval_of_the_fine_tuned_checkpoint_matches_its_validation, of a CLIP eval many tests')."""
    return cli_json("eval", "--checkpoint", str(runs["pre"]), "--data", shards["val"], "--json")


def test_finetuned_beats_zero_shot(runs, zeroshot):
    val = [r for r in read_metrics(runs["ft"]) if "val/top1" in r]
    assert [r["step"] for r in val] == [EVAL_EVERY, FT_STEPS]
    for r in val:
        assert r["val/samples"] == 128 and 0.0 <= r["val/top1"] <= r["val/top5"] <= 1.0
    assert val[-1]["val/top1"] >= zeroshot["zeroshot_top1"] + MARGIN, (val, zeroshot)
    train_rows = [r for r in read_metrics(runs["ft"]) if "loss" in r]
    assert len(train_rows) == FT_STEPS and train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_wise_ft_sweep_ends_match_zero_shot_and_fine_tuned(runs, zeroshot):
    sweep = runs["summary"]["wise_ft"]
    assert [r["alpha"] for r in sweep["results"]] == list(ALPHAS)
    assert sweep["samples"] == 128 and sweep["step"] == FT_STEPS
    by_alpha = {r["alpha"]: r for r in sweep["results"]}
    assert by_alpha[0.0]["top1"] == zeroshot["zeroshot_top1"]
    assert by_alpha[0.0]["top5"] == zeroshot["zeroshot_top5"]
    last_val = [r for r in read_metrics(runs["ft"]) if "val/top1" in r][-1]
    assert by_alpha[1.0]["top1"] == last_val["val/top1"]
    assert by_alpha[1.0]["loss"] == pytest.approx(last_val["val/loss"], abs=1e-4)
    assert json.loads((runs["ft"] / "wise_ft.json").read_text()) == sweep
    for alpha in ALPHAS:  # the table on stderr lists every alpha
        assert f"| {alpha:g} | {by_alpha[alpha]['top1']:.4f} |" in runs["stderr"]


def test_pretrain_eval_of_the_fine_tuned_checkpoint_matches_its_validation(runs, shards):
    """`pretrain eval` of the fine-tune's 2-rank ZeRO-3 checkpoint, in one process (ranks: the unit tests'
    two gloo ranks), reports the accuracy the run's last validation computed on the live model on the same
    shards (the class names beside them are the checkpoint's, so they are accepted)."""
    r = run_pretrain(["eval", "--checkpoint", str(runs["ft"]), "--data", shards["val"], "--batch-size", "16",
                      "--json"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))
    last_val = [row for row in read_metrics(runs["ft"]) if "val/top1" in row][-1]
    assert got["samples"] == last_val["val/samples"] == 128 and got["skipped"] == {}
    assert got["classify_top1"] == pytest.approx(last_val["val/top1"], abs=1e-6)
    assert got["classify_top5"] == pytest.approx(last_val["val/top5"], abs=1e-6)
    assert got["classify_loss"] == pytest.approx(last_val["val/loss"], abs=1e-4)
    assert got["classify_top1"] > got["chance"] and got["classes"] == 32


def test_checkpoint_holds_image_tower_and_head_only(runs):
    from safetensors.torch import load_file

    from pretrain.checkpoint.sources import open_source

    src = open_source(runs["ft"])
    names = src.names
    assert src.meta["classnames"][0] == "red circle" and len(src.meta["classnames"]) == 32
    assert {n.split(".")[0] for n in names} == {"visual", "head"}  # no text tower, decoder or MLM head
    assert src.layout["head.weight"]["shape"] == [32, 32]
    zs = load_file(str(runs["ft"] / "zeroshot.safetensors"))
    assert set(zs) == set(names)
    init = open_source(runs["pre"])
    for n in names:
        if n.startswith("visual."):  # the zero-shot end is the init's image tower, unchanged
            assert (zs[n] == init.tensor(n)).all(), n


def test_wise_ft_reads_checkpoint_dir_and_a_resume_refuses_other_class_names(shards, tmp_path):
    """`checkpoint.dir` outside `run.dir`: the sweep after training finds the run's checkpoints there. A
    `--resume` with a class-names file of another length then stops in one line naming finetune.classnames
    and both files (not DeepSpeed's size mismatch deep in the ZeRO-3 load). One process, no --init-from,
    2 steps: start-up and the sweep are most of the time."""
    run, ck = tmp_path / "run", tmp_path / "ck"
    common = ["finetune", *TINY, "--task", "classify", "--train", shards["train"], f"run.dir={run}",
              f"checkpoint.dir={ck}", "logging.tensorboard=false", "data.workers=1"]
    r = run_pretrain([*common, "--val", shards["val"], "--classnames", shards["classnames"], "train.steps=2",
                      "eval.max_samples=16", "--wise-ft", "0", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # the final summary, sweep included
    assert summary["wise_ft"]["checkpoint"] == str(ck / "global_step2") and summary["wise_ft"]["step"] == 2
    assert json.loads((run / "wise_ft.json").read_text()) == summary["wise_ft"]

    more = tmp_path / "cn33.txt"
    more.write_text(Path(shards["classnames"]).read_text() + "extra class\n")
    r = run_pretrain([*common, "--classnames", str(more), "train.steps=4", "--resume", "latest"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith(
        f"pretrain: config error: finetune.classnames: {more} holds 33 classes, but the checkpoint "
        f"{ck / 'global_step2'} (--resume) was trained on the 32 classes of {shards['classnames']}")
    assert "Traceback" not in r.stderr and (ck / "latest").read_text().strip() == "global_step2"
