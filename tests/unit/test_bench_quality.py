"""`pretrain bench quality`: its digits shards (real scans from scikit-learn), the per-recipe overrides
(equal samples seen, each recipe a valid config), the table, and one tiny end-to-end run; the
open_clip_train recipe runs only where MMPT_OPEN_CLIP_PYTHON names a python with open_clip_train."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from datautil import tiny_tokenizer

from data_pipelines.digits import DIGIT_NAMES, write_digits
from data_pipelines.loader import make_eval_loader
from pretrain.bench.quality import RECIPES, markdown, parse_added_recipes, recipe_overrides, summarize
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(**kw) -> argparse.Namespace:
    base = dict(samples_seen=1000, batch_size=32, image_size=32, tail_fraction=0.1, seed=0, set=[])
    return argparse.Namespace(**{**base, **kw})


def test_digits_shards_hold_real_labelled_scans(tmp_path):
    info = write_digits(tmp_path, image_size=24)
    assert info["train_samples"] + info["val_samples"] == 1797 and info["val_samples"] == 360
    assert (tmp_path / "val" / "classnames.txt").read_text().split() == list(DIGIT_NAMES)
    batch = next(iter(make_eval_loader(info["val"], tiny_tokenizer(), 24, 400, 16, [0.5] * 3, [0.5] * 3)))
    assert batch["image"].shape == (360, 3, 24, 24)
    assert sorted(set(batch["cls"].tolist())) == list(range(10))
    assert batch["image"].std() > 0.3  # strokes, not blank images


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_valid_config_with_equal_samples_seen(name, tmp_path):
    data = {"train": "t/shard-000000.tar", "tokenizer": "tok.json"}
    cfg = load_config(embedded_config_path(), recipe_overrides(name, data, tmp_path, _args()))
    assert cfg.train.steps * cfg.train.micro_batch == 992  # 1000 // 32 steps of 32
    o = cfg.objectives
    if name.startswith("contrastive") or name in ("open_clip_train", "flip50_tail"):
        assert o.mim.weight == o.mlm.weight == 0
        assert o.mim.mask_ratio == (0.5 if "flip50" in name else 0.0)
    else:
        assert o.mim.weight > 0 and o.mlm.weight > 0  # every other recipe keeps all three objectives
    assert o.mim.unmasked_tail_steps == (3 if name in ("default_tail", "flip50_tail") else 0)
    if name in ("shared_pass", "separate_views"):  # pixel MAE, on FLIP's masked pass or on its own
        assert o.mim.shared_pass is (name == "shared_pass") and o.mim.target == "pixels"


def test_added_recipes_are_named_ablations_on_the_defaults(tmp_path):
    spec = [["sv_nomlm", "objectives.mim.shared_pass=false", "objectives.mlm.weight=0"]]
    assert parse_added_recipes(spec) == {"sv_nomlm": spec[0][1:]}
    data = {"train": "t/shard-000000.tar", "tokenizer": "tok.json"}
    overrides = recipe_overrides("sv_nomlm", data, tmp_path, _args(add_recipe=spec))
    cfg = load_config(embedded_config_path(), overrides)
    assert cfg.objectives.mlm.weight == 0 and cfg.objectives.mim.shared_pass is False
    with pytest.raises(ValueError, match="--add-recipe default: the name is taken"):
        parse_added_recipes([["default", "objectives.mlm.weight=0"]])
    with pytest.raises(ValueError, match="'objectives.mlm.weight' is not KEY=VALUE"):
        parse_added_recipes([["x", "objectives.mlm.weight"]])


def test_summary_is_mean_and_std_over_seeds():
    rows = [{"dataset": "d", "recipe": "r", "seed": s, "zeroshot_top1": z, "linear_probe_top1": 0.5,
             "wall_s": 10.0} for s, z in ((0, 0.6), (1, 0.8))]
    rows.append({"dataset": "d", "recipe": "r", "seed": 2, "error": "boom"})  # failed runs are left out
    (s,) = summarize(rows)
    assert s["seeds"] == [0, 1] and s["zeroshot_top1"] == pytest.approx(0.7)
    assert s["zeroshot_top1_std"] == pytest.approx(0.1414, abs=1e-4) and s["linear_probe_top1_std"] == 0
    text = markdown(rows, "cmd", "abc")
    assert "| d | r | 2 | 0.700 ± 0.141 |" in text


def test_markdown_table():
    rows = [{"dataset": "digits", "recipe": "default", "zeroshot_top1": 0.5, "zeroshot_top5": 0.9,
             "i2t_r1": 0.1, "i2t_r5": 0.2, "t2i_r1": 0.1, "t2i_r5": 0.3, "linear_probe_top1": 0.8,
             "wall_s": 10.0, "samples_per_s": 99.0},
            {"dataset": "digits", "recipe": "open_clip_train", "error": "RuntimeError: boom"}]
    text = markdown(rows, "pretrain bench quality --out x", "abc1234")
    assert "commit abc1234" in text and "`pretrain bench quality --out x`" in text
    assert "| digits | default |  | 0.500 | 0.900 |" in text and "failed: RuntimeError: boom" in text


def test_tiny_end_to_end(tmp_path, capsys):
    args = ["bench", "quality", "--out", str(tmp_path), "--datasets", "digits", "--recipes", "default_tail",
            "--seeds", "0", "1", "--samples-seen", "64", "--batch-size", "16", "--image-size", "16",
            "--strict", "--set",
            "model.vision.patch_size=4", "model.vision.layers=1", "model.text.layers=1",
            "model.vision.width=32", "model.text.width=32", "model.embed_dim=16", "model.decoder.width=16",
            "model.decoder.layers=1", "data.vocab_size=128"]
    assert main(args) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = report["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    for row in rows:
        assert row["recipe"] == "default_tail" and row["samples_seen"] == 64 and "error" not in row
        for key in ("zeroshot_top1", "i2t_r1", "t2i_r5", "linear_probe_top1", "wall_s", "samples_per_s"):
            assert row[key] is not None
    (summary,) = report["summary"]
    assert summary["seeds"] == [0, 1]
    assert summary["linear_probe_top1"] == pytest.approx(sum(r["linear_probe_top1"] for r in rows) / 2)
    log = tmp_path / "runs/digits/default_tail/seed1/metrics.jsonl"
    metrics = [json.loads(line) for line in log.open()]
    assert metrics[-1]["contrastive_mask_ratio"] == 0.0  # the last step is in the unmasked tail


@pytest.mark.skipif(not os.environ.get("MMPT_OPEN_CLIP_PYTHON"),
                    reason="set MMPT_OPEN_CLIP_PYTHON to a python with open_clip_train (webdataset<=0.2.86)")
def test_open_clip_train_recipe(tmp_path):
    args = ["bench", "quality", "--out", str(tmp_path), "--datasets", "digits",
            "--recipes", "open_clip_train", "--samples-seen", "64", "--batch-size", "16",
            "--image-size", "16", "--strict",
            "--open-clip-python", os.environ["MMPT_OPEN_CLIP_PYTHON"], "--set", "model.vision.patch_size=4",
            "model.vision.layers=1", "model.text.layers=1", "data.vocab_size=128"]
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert row["linear_probe_top1"] is not None and torch.isfinite(torch.tensor(row["zeroshot_top1"]))


@pytest.mark.parametrize("seen,batch,train", [(8192, 64, 1437), (8192, 64, 4096), (1000, 32, 1437),
                                              (64, 16, 1437), (4160, 64, 300)])
def test_open_clip_epochs_give_exactly_our_steps(seen, batch, train):
    from pretrain.bench.quality_openclip import epoch_plan

    epochs, per_epoch = epoch_plan(seen, batch, train)
    assert epochs * per_epoch == seen // batch * batch and per_epoch % batch == 0
    assert per_epoch <= max(train, batch)  # no epoch asks for more than one pass over the shards


@pytest.mark.parametrize("sets,flag", [(["train.seed=7"], "--set train.seed: use --seeds"),
                                       (["train.steps=3"], "--set train.steps: use --samples-seen"),
                                       (["train.micro_batch=8"], "--set train.micro_batch: use --batch-size"),
                                       (["model.image_size=64"], "--set model.image_size: use --image-size"),
                                       (["run.dir=x"], "--set run.dir: the bench sets it"),
                                       (["data.train=x.tar"], "--set data.train: the bench sets it"),
                                       (["objectives.mim.weight=0.5"],
                                        "--set objectives.mim.weight: use --add-recipe NAME KEY=VALUE "
                                        "(recipe contrastive_full sets it)")])
def test_set_of_a_key_the_bench_or_a_recipe_sets_is_refused(tmp_path, capsys, monkeypatch, sets, flag):
    """`--set train.seed=7 --seeds 0 1` trained seed 7 twice and labelled the rows seed 0 and seed 1."""
    import pretrain.bench.quality_data as quality_data

    def not_refused(*a, **k):
        raise AssertionError("not refused: the bench went on to write data and train")
    monkeypatch.setattr(quality_data, "prepare_dataset", not_refused)
    out = tmp_path / "q"
    args = ["bench", "quality", "--out", str(out), "--datasets", "digits", "--recipes", "contrastive_full",
            "--seeds", "0", "1", "--set", "model.vision.layers=1", *sets]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bench quality: " + flag in err and "model.vision.layers" not in err
    assert not out.exists()  # refused before any data is written


def test_set_of_a_key_no_chosen_recipe_pins_is_kept():
    from pretrain.bench.quality import set_problems

    ns = argparse.Namespace(recipes=["default"], add_recipe=None, set=["objectives.mim.weight=0.25"])
    assert set_problems(ns) == []
    ns.add_recipe = [["mine", "objectives.mim.weight=0"]]  # an added recipe pins it too
    assert set_problems(ns) == ["--set objectives.mim.weight: use --add-recipe NAME KEY=VALUE (recipe mine "
                                "sets it)"]
