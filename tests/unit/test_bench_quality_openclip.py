"""`pretrain bench quality`, recipe `open_clip_train`: our settings reach open_clip_train's command line with
the same meaning (grad clip 0 = no clipping, not `--grad-clip-norm 0.0`, which zeroes every gradient),
`--set` keys it cannot follow are refused, and a baseline whose weights never moved is flagged. The real
trainer is not run here (tests/unit/test_bench_quality.py runs it where MMPT_OPEN_CLIP_PYTHON is set):
`subprocess.run` is replaced by a stand-in that writes the checkpoint open_clip_train would."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from datautil import tiny_tokenizer

from pretrain.bench import quality_openclip
from pretrain.bench.quality import RECIPES, SMALL, markdown, summarize
from pretrain.bench.quality_openclip_args import open_clip_argv
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config
from pretrain.export.common import load_weight_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1", "model.text.width=32",
        "model.text.layers=1", "model.embed_dim=16", "model.image_size=16", "data.vocab_size=200"]


def _cfg(*extra: str):
    return load_config(embedded_config_path(), [*SMALL, *RECIPES["open_clip_train"], *TINY, *extra])


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_grad_clip_zero_is_no_clipping_not_a_zero_norm(tmp_path):
    """open_clip_train runs `clip_grad_norm_(params, 0.0)` for `--grad-clip-norm 0.0`: every gradient
    becomes 0 and the baseline trains nothing; our 0 means "no clipping", i.e. no flag."""
    argv = open_clip_argv(_cfg("train.grad_clip=0"), "t.tar", 64, 2, tmp_path, "cpu")
    assert "--grad-clip-norm" not in argv
    assert _flag(open_clip_argv(_cfg("train.grad_clip=0.5"), "t.tar", 64, 2, tmp_path, "cpu"),
                 "--grad-clip-norm") == "0.5"


def test_schedule_and_precision_map_to_open_clips_equivalents(tmp_path):
    argv = open_clip_argv(_cfg(), "t.tar", 64, 2, tmp_path, "cpu")
    assert _flag(argv, "--lr-scheduler") == "cosine" and _flag(argv, "--precision") == "fp32"
    argv = open_clip_argv(_cfg("optim.schedule=constant", "train.precision=bf16_autocast"), "t.tar", 64, 2,
                          tmp_path, "cpu")
    assert _flag(argv, "--lr-scheduler") == "const" and _flag(argv, "--precision") == "amp_bf16"
    assert _flag(argv, "--batch-size") == "64" and _flag(argv, "--epochs") == "2"
    with pytest.raises(ValueError, match="train.precision=bf16"):
        open_clip_argv(_cfg("train.precision=bf16"), "t.tar", 64, 2, tmp_path, "cpu")


@pytest.mark.parametrize("kv,why", [
    ("optim.min_lr_ratio=0.05", "cosine decays to 0"),
    ("objectives.contrastive.max_logit_scale=50", "clamps the logit scale at 100"),
    ("optim.lr_mult={text.*: 0.1}", "one learning rate"),
    ("train.precision=bf16", "no equivalent there"),
    ("model.vision.block_init=pytorch", "no equivalent setting"),
    ("data.shuffle_buffer=64", "no equivalent setting"),
])
def test_set_keys_open_clip_cannot_follow_are_refused(tmp_path, capsys, monkeypatch, kv, why):
    import pretrain.bench.quality_data as quality_data

    def not_refused(*a, **k):
        raise AssertionError("not refused: the bench went on to write data and train")
    monkeypatch.setattr(quality_data, "prepare_dataset", not_refused)
    out = tmp_path / "q"
    assert main(["bench", "quality", "--out", str(out), "--datasets", "digits", "--recipes", "default",
                 "open_clip_train", "--set", "model.vision.layers=1", kv]) == 2
    err = capsys.readouterr().err
    key = kv.split("=")[0]
    assert f"--set {key}" in err and why in err and "not like-for-like" in err
    assert "model.vision.layers" not in err and not out.exists()


def test_set_keys_open_clip_follows_are_kept():
    import argparse

    from pretrain.bench.quality import set_problems

    ns = argparse.Namespace(recipes=["open_clip_train"], add_recipe=None, set=[
        "train.grad_clip=0", "optim.schedule=constant", "optim.min_lr_ratio=0.3", "optim.lr=3e-4",
        "objectives.contrastive.init_temperature=0.1", "model.text.layers=2",
        "train.precision=bf16_autocast"])
    assert set_problems(ns) == []  # min_lr_ratio does nothing under a constant schedule
    ns.set = ["optim.min_lr_ratio=0"]  # cosine to 0: open_clip's own cosine
    assert set_problems(ns) == []


def _fake_open_clip(move: bool):
    """subprocess.run standing in for open_clip_train: saves its model's initial weights (the export of
    our init) as the last epoch, the logit scale nudged when `move`; records the command line."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        folder = Path(kw["cwd"]) / "open_clip_model"
        state = load_weight_file(folder / "open_clip_model.safetensors")
        if move:
            state["logit_scale"] = state["logit_scale"] + 1e-3
        ckpts = Path(_flag(cmd, "--logs")) / "run" / "checkpoints"
        ckpts.mkdir(parents=True)
        torch.save({"epoch": 1, "state_dict": state}, ckpts / f"epoch_{_flag(cmd, '--epochs')}.pt")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run, calls


@pytest.mark.parametrize("move", [False, True])
def test_a_baseline_whose_weights_never_moved_is_flagged(tmp_path, monkeypatch, move):
    tok = tmp_path / "tok.json"
    tiny_tokenizer().save(tok)
    run, calls = _fake_open_clip(move)
    monkeypatch.setattr(quality_openclip.subprocess, "run", run)
    cfg = _cfg("train.micro_batch=16", "train.grad_clip=0")
    data = {"train": "t/shard-000000.tar", "train_samples": 64}
    _, _, samples, check = quality_openclip.train_open_clip(cfg, str(tok), data, tmp_path / "run", 64,
                                                            "python", "cpu")
    assert samples == 64 and "--grad-clip-norm" not in calls[0]
    assert check["baseline_trained"] is move
    assert check["logit_scale_start"] == pytest.approx(1 / 0.07, rel=1e-4)
    assert (check["logit_scale_end"] != check["logit_scale_start"]) is move
    assert check["norm_tensors_moved"] == 0


def test_an_untrained_baseline_row_is_marked_and_left_out_of_the_means():
    base = {"dataset": "d", "seed": 0, "zeroshot_top1": 0.1, "linear_probe_top1": 0.2, "wall_s": 1.0}
    rows = [{**base, "recipe": "default"},
            {**base, "recipe": "open_clip_train", "baseline_trained": False}]
    assert [s["recipe"] for s in summarize(rows)] == ["default"]
    assert "| d | open_clip_train (NOT TRAINED" in markdown(rows, "cmd", "abc")
