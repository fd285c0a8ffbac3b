"""`pretrain eval --suite`: the whole file checked up front (every error at once, dataset and key named),
tables and JSON per checkpoint plus the comparison, and the metric-vs-step PNG over a run's complete
checkpoints. Models here are random tiny ones handed in for `load_model` (one per checkpoint tag), so the
numbers can be checked against `evaluate` on the same model; tests/e2e/test_eval_suite.py runs real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import MICRO, fake_run

from pretrain.cli import main
from pretrain.config.loading import load_config
from pretrain.evaluation import evaluate as evaluate_module
from pretrain.evaluation.suite import check_suite, load_suite
from pretrain.models.pretrain_model import PretrainModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models(monkeypatch, tiny_tok):
    """load_model(checkpoint, tag) -> a random tiny model seeded by (run name, tag), recorded in `calls`."""
    cfg = load_config(None, [o for o in MICRO if not o.startswith("data.")])
    calls: list[tuple[str, str | None]] = []

    def fake(checkpoint, tag=None):
        calls.append((Path(checkpoint).name, tag))
        torch.manual_seed(hash((Path(checkpoint).name, tag)) % 2**31)
        return PretrainModel.from_config(cfg, tiny_tok).eval(), tiny_tok, cfg

    monkeypatch.setattr(evaluate_module, "load_model", fake)
    return calls, fake


def test_every_problem_is_reported_at_once_naming_dataset_and_key(tmp_path, shards):
    f = tmp_path / "suite.yaml"
    f.write_text(yaml.safe_dump({
        "colour": 1,
        "plot": ["i2t_r1", "accuracy"],
        "datasets": [
            {"name": "a", "data": shards["val"], "tasks": ["zeroshot", "segmentation"], "extra": 1},
            {"name": "a", "data": shards["val"], "tasks": ["linear_probe"]},
            {"name": "c", "tasks": ["few_shot"], "train": shards["train"]},
            {"name": "d", "data": str(tmp_path / "nowhere" / "x.tar")},
            {"name": "e", "data": shards["val"], "few_shot": 3},
            "just a string",
        ]}))
    with pytest.raises(ValueError) as err:
        load_suite(f, [str(tmp_path / "no_run")])
    msg = str(err.value)
    for part in [f"{f}: bad suite", "suite: unknown key 'colour'",
                 "dataset 'a': tasks: a non-empty list of zeroshot, retrieval, linear_probe, few_shot",
                 "dataset 'a': unknown key 'extra'", "dataset 'a': the name is used twice",
                 "dataset 'a': tasks linear_probe/few_shot need 'train'",
                 "dataset 'c': few_shot (K per class, required by the few_shot task): must be an integer",
                 "dataset 'c': 'data' is required", "dataset 'd': shard spec", "do not exist",
                 "dataset 'e': few_shot: 3 given but 'few_shot' is not in tasks",
                 "datasets[5]: must be a mapping", f"checkpoint {tmp_path / 'no_run'}: not found",
                 "plot: 'accuracy' is not a metric of any dataset's tasks (they give: few_shot_top1, i2t_r1"]:
        assert part in msg, (part, msg)
    assert "plot: 'i2t_r1'" not in msg  # dataset "e" asks for retrieval (the default tasks)
    with pytest.raises(ValueError, match="no checkpoint: list 'checkpoints'"):
        check_suite({"datasets": [{"name": "v", "data": shards["val"]}]})


def test_bad_suite_fails_before_any_model_is_loaded_and_writes_nothing(tmp_path, shards, models, capsys):
    calls, _ = models
    run = fake_run(tmp_path / "run", [2])
    f = tmp_path / "suite.yaml"
    bad = {"name": "w", "data": shards["val"], "classnames": "nope.txt"}
    f.write_text(yaml.safe_dump({"datasets": [{"name": "v", "data": shards["val"]}, bad]}))
    assert main(["eval", "--suite", str(f), "--checkpoint", run, "--out", str(tmp_path / "out")]) == 2
    assert "dataset 'w': nope.txt: class names file not found" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "out").exists()


def test_tables_json_and_plot_for_two_runs(tmp_path, shards, models, capsys):
    calls, fake = models
    a, b = fake_run(tmp_path / "a", [2, 4]), fake_run(tmp_path / "b", [3])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a drawing of a {c}\n")
    f = tmp_path / "suite.yaml"
    f.write_text(yaml.safe_dump({"checkpoints": [a], "batch_size": 64, "datasets": [
        {"name": "shapes", "data": shards["val"], "tasks": ["zeroshot", "retrieval"]},
        {"name": "shapes-probe", "data": shards["val"], "templates": str(prompts), "max_samples": 64,
         "tasks": ["zeroshot", "few_shot"], "train": shards["train"].replace("7}", "3}"), "few_shot": 2}]}))
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(f), "--checkpoint", b, "--out", str(out), "--plot", "zeroshot_top1",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.md", "b.json", "b.md", "comparison.md",
                                                     "suite-index.json", "zeroshot_top1.json",
                                                     "zeroshot_top1.png"]
    # every complete checkpoint once, the newest reused for the tables
    assert sorted(calls, key=str) == [("a", "global_step2"), ("a", "global_step4"), ("b", "global_step3")]
    got = json.loads((out / "a.json").read_text())
    assert got["checkpoint"] == a and printed["results"]["a"] == got["datasets"]
    want = evaluate_module.evaluate(None, shards["val"], shards["classnames"], batch_size=64,
                                    model_bundle=fake(a, "global_step4"))
    timing = ("seconds", "images_per_s")
    assert {k: v for k, v in got["datasets"]["shapes"].items() if k not in timing} == {
        k: v for k, v in want.items() if k not in timing}
    probe = got["datasets"]["shapes-probe"]
    assert probe["samples"] == 64 and probe["few_shot_k"] == 2 and "few_shot_top1" in probe
    want = evaluate_module.evaluate(None, shards["val"], shards["classnames"], batch_size=64, max_samples=64,
                                    model_bundle=fake(a, "global_step4"), templates=["a drawing of a {}"])
    assert probe["zeroshot_top1"] == want["zeroshot_top1"]
    table = (out / "comparison.md").read_text().splitlines()
    assert table[2] == "| dataset | metric | a | b |"
    row = next(r for r in table if r.startswith("| shapes | i2t_r1 |"))
    bj = json.loads((out / "b.json").read_text())["datasets"]
    mine, theirs = got["datasets"]["shapes"]["i2t_r1"], bj["shapes"]["i2t_r1"]
    assert row == f"| shapes | i2t_r1 | {mine:.4f} | {theirs:.4f} |"
    md = (out / "a.md").read_text()
    assert "few_shot_top1" in md and "| shapes-probe | 64 |" in md
    curve = json.loads((out / "zeroshot_top1.json").read_text())
    assert sorted(curve) == ["a / shapes", "a / shapes-probe", "b / shapes", "b / shapes-probe"]
    assert [s for s, _ in curve["a / shapes"]] == [2, 4] and curve["a / shapes"][1][1] == got["datasets"][
        "shapes"]["zeroshot_top1"]
    assert (out / "zeroshot_top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_on_one_data_without_a_suite_and_plot_needs_runs(tmp_path, shards, models, capsys):
    a = fake_run(tmp_path / "a", [1, 2, 3])
    out = tmp_path / "out"
    plot = ["--plot", "t2i_r5"]
    assert main(["eval", "--checkpoint", a, "--data", shards["val"], *plot, "--out", str(out)]) == 0
    assert "| data | t2i_r5 |" in capsys.readouterr().out
    assert [s for s, _ in json.loads((out / "t2i_r5.json").read_text())["a / data"]] == [1, 2, 3]
    weights = tmp_path / "export"
    weights.mkdir()
    assert main(["eval", "--checkpoint", str(weights), "--data", shards["val"], "--plot", "t2i_r5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--plot needs a run directory or checkpoint folder with complete checkpoints" in err
    assert main(["eval", "--checkpoint", a, "--data", shards["val"], "--plot", "t2i_r5"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
