"""`pretrain eval --suite ... --plot` on a real run: every complete checkpoint (by tag) is loaded and scored,
the newest one's numbers equal a plain `pretrain eval`, and a CLIP_benchmark folder works as a dataset."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import run_pretrain, train_args, write_micro_shards

from pretrain.cli import main

pytestmark = pytest.mark.slow


def test_suite_plots_every_checkpoint_of_a_real_run(tmp_path, capsys):
    shards = write_micro_shards(tmp_path / "shards")
    run = tmp_path / "run"
    r = run_pretrain(["train", *train_args(shards, run, 4, "data.workers=0", "checkpoint.every=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    cb = tmp_path / "cb"
    assert main(["data", "clip-benchmark", f"{tmp_path}/shards/shard-000003.tar", str(cb)]) == 0
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"checkpoints": [str(run)], "plot": "zeroshot_top1", "datasets": [
        {"name": "held-out", "data": str(cb), "tasks": ["zeroshot", "retrieval"]},
        {"name": "probe", "data": str(cb), "tasks": ["linear_probe", "few_shot"], "few_shot": 1,
         "train": f"{tmp_path}/shards/shard-{{000000..000002}}.tar"}]}))
    capsys.readouterr()
    assert main(["eval", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| dataset | metric | run |" in printed and "| probe | few_shot_top1 |" in printed
    curve = json.loads((tmp_path / "out" / "zeroshot_top1.json").read_text())
    assert [s for s, _ in curve["run / held-out"]] == [2, 4]
    got = json.loads((tmp_path / "out" / "run.json").read_text())["datasets"]["held-out"]
    assert main(["eval", "--checkpoint", str(run), "--data", str(cb), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    timing = ("seconds", "images_per_s")
    assert ({k: v for k, v in got.items() if k not in timing}
            == {k: v for k, v in plain.items() if k not in timing})
    assert curve["run / held-out"][-1][1] == plain["zeroshot_top1"]
