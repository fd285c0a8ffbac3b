"""`pretrain bench cross-site`'s arithmetic: plain data parallelism's bytes for the whole run from two short
runs, bytes per sample and the ratios (the training itself is what tests/e2e/test_cross_site.py runs)."""

from __future__ import annotations

import argparse
import json

import pytest

from pretrain.bench import cross_site as bench
from pretrain.bench import cross_site_report as report_mod


def test_dp_bytes_split_start_up_from_per_step_cost(monkeypatch, tmp_path):
    startup, per_step = 3_000_000, 400_000  # what a fake link reports: one broadcast + an all-reduce a step
    seen = []

    def fake_run_job(name, out, hosts, starts, timeout_s):
        steps = int(name.removeprefix("dp"))
        seen.append((steps, starts))
        return {"wall_s": 1.0, "link_bytes": startup + steps * per_step}

    monkeypatch.setattr(bench, "_run_job", fake_run_job)
    monkeypatch.setattr(bench, "_sync_starts", lambda data, run_dir, args, hosts, *extra: [(0, [*extra])])
    args = argparse.Namespace(dp_steps=[5, 15], steps=300, micro_batch=32, sites=2, ranks_per_site=2,
                              job_timeout_s=10)
    out = bench._dp_bytes({}, tmp_path, args, hosts=None)
    assert [s for s, _ in seen] == [5, 15]
    assert all(starts == [(0, ["parallel.zero_stage=0"])] for _, starts in seen)  # plain DP
    assert out["link_bytes_per_step"] == per_step and out["link_bytes_startup"] == startup
    assert out["link_bytes"] == startup + 300 * per_step
    assert out["samples_seen"] == 300 * 32 * 4


def test_alone_is_site_a_without_the_outer_loop(tmp_path):
    """`--jobs alone`: site a's shards and ranks, and nothing of the outer loop, so its zero-shot is what one
    site learns from its share by itself."""
    args = argparse.Namespace(sites=2, ranks_per_site=2, micro_batch=32, steps=300, every=20, compress="int8",
                              timeout_s=300, set=[])
    data = {"train": "/d/train", "shards": 24, "tokenizer": "/d/tok.json"}
    [(side, argv)] = bench._alone_starts(data, tmp_path / "alone", args)
    sites = bench._site_starts(data, tmp_path, args, hosts=None)
    site_a = sites[0][1]
    assert "data.train=/d/train/shard-{000000..000011}.tar" in argv and site_a.count(
        "data.train=/d/train/shard-{000000..000011}.tar") == 1
    assert "data.train=/d/train/shard-{000012..000023}.tar" in sites[1][1]
    assert not any(a.startswith("cross_site.") for a in argv) and "--site" not in argv
    assert argv[argv.index("--procs-per-node") + 1] == "2" and f"run.dir={tmp_path / 'alone'}" in argv
    # the rest of the training arguments are site a's own
    keep = [a for a in site_a[site_a.index("--") + 1:] if not a.startswith(("cross_site.", "run.dir="))]
    assert keep == [a for a in argv[argv.index("--") + 1:] if not a.startswith("run.dir=")]


def test_alone_is_a_job_the_command_line_takes_but_not_a_default():
    parser = argparse.ArgumentParser()
    bench.add_cross_site_parser(parser.add_subparsers())
    assert parser.parse_args(["cross-site", "--out", "o", "--jobs", "alone"]).jobs == ["alone"]
    assert parser.parse_args(["cross-site", "--out", "o"]).jobs == ["sync", "sites", "dp"]


def test_report_ratios_and_gap(monkeypatch, tmp_path):
    jobs = {"sync": {"wall_s": 1, "link_bytes": 6_000, "zeroshot_top1": 0.50},
            "sites": {"wall_s": 1, "link_bytes": 100, "zeroshot_top1": 0.49},
            "dp": {"wall_s": 1, "link_bytes": 4_000}}
    report = bench.summarize(jobs, samples=10)
    assert report["zeroshot_gap_points"] == pytest.approx(1.0)
    assert report["bytes_ratio_dp_vs_sites"] == pytest.approx(40.0)
    assert report["bytes_ratio_sync_vs_sites"] == pytest.approx(60.0)
    assert jobs["sites"]["link_bytes_per_sample"] == 10.0
    text = bench.markdown({**report, "jobs": jobs, "command": "pretrain bench cross-site", "commit": "x",
                           "date": "d", "link": "l", "samples_seen": 10})
    assert "| sites | 0.490 |" in text and "bytes_ratio_dp_vs_sites: 40.0" in text


def test_markdown_puts_each_jobs_curve_side_by_side_by_step():
    row = {"i2t_r1": 0.1, "t2i_r1": 0.05}
    sync_curve = [{"step": 2, "zeroshot_top1": 0.5, **row}, {"step": 4, "zeroshot_top1": 0.9, **row}]
    jobs = {"sync": {"wall_s": 1, "zeroshot_top1": 0.9, "curve": sync_curve},
            "sites": {"wall_s": 1, "zeroshot_top1": 0.8, "curve": [{"step": 4, "zeroshot_top1": 0.8, **row}]},
            "dp": {"wall_s": 1}}
    head = {"command": "c", "commit": "x", "date": "d", "link": "l", "samples_seen": 1}
    text = bench.markdown({**head, "jobs": jobs})
    assert "| step | sync top-1 / i2t / t2i | sites top-1 / i2t / t2i |" in text  # dp kept no curve
    assert "| 2 | 0.500 / 0.100 / 0.050 | - |" in text  # a step one job has no checkpoint at
    assert "| 4 | 0.900 / 0.100 / 0.050 | 0.800 / 0.100 / 0.050 |" in text
    assert "step" not in bench.markdown({**head, "jobs": {"dp": {"wall_s": 1}}})


def test_samples_to_match_interpolates_the_first_crossing_and_says_why_when_there_is_none():
    r1 = {"i2t_r1": 0.1, "t2i_r1": 0.1}
    sync = [{"step": s, "zeroshot_top1": v, **r1} for s, v in ((300, 0.6), (600, 0.9), (900, 0.95))]
    sites = [{"step": s, "zeroshot_top1": v, **r1}
             for s, v in ((300, 0.5), (600, 0.8), (900, 0.92), (1200, 0.7))]  # first crossing counts
    rows = report_mod.samples_to_match(sync, sites)
    # 0.6 lies 1/3 of the way from 0.5 (step 300) to 0.8 (step 600); 0.9 5/6 of the way from 0.8 to 0.92
    assert [r["other_step"] for r in rows[:2]] == [400.0, 850.0]
    assert [r["ratio"] for r in rows[:2]] == [pytest.approx(1.33), pytest.approx(1.42)]
    assert rows[2]["other_step"] is None and rows[2]["why"] == "not reached by its last checkpoint"
    early = report_mod.samples_to_match([{"step": 600, "zeroshot_top1": 0.4, **r1}], sites)[0]
    assert early["ratio"] is None and early["why"] == "reached at or before its first checkpoint (step 300)"
    report = bench.summarize({"sync": {"zeroshot_top1": 0.95, "curve": sync},
                              "sites": {"zeroshot_top1": 0.7, "curve": sites}}, samples=1)
    assert report["sites_samples_to_match_sync"] == rows
    head = {"command": "c", "commit": "x", "date": "d", "link": "l", "samples_seen": 1}
    text = bench.markdown({**head, **report, "jobs": {"sync": {"wall_s": 1, "curve": sync},
                                                      "sites": {"wall_s": 1, "curve": sites}}})
    assert "sync's zero-shot at step 300 (0.600): the sites at step 400 (1.33x the samples)" in text
    assert "sync's zero-shot at step 900 (0.950): the sites: not reached by its last checkpoint" in text


@pytest.mark.parametrize("change,flag", [
    ({"dp_steps": [5, 5]}, "--dp-steps"), ({"dp_steps": [0, 15]}, "--dp-steps"), ({"sites": 1}, "--sites"),
    ({"sites": 25}, "--sites 25: the data has only 24 shards"), ({"every": 400}, "--every"),
    ({"ranks_per_site": 0}, "--ranks-per-site"), ({"train_samples": 700}, "--train-samples 700"),
    ({"train_samples": 500}, "--sites 2: the data has only 1 shards"),
    ({"set": ["cross_site.compress=none"]}, "--set cross_site.compress: use --compress"),
    ({"set": ["optim.lr=1e-3", "train.steps=9"]}, "--set train.steps: use --steps"),
    ({"set": ["run.dir=x"]}, "--set run.dir: the bench sets it"),
    ({"curve": True, "set": ["checkpoint.dir=/x"]}, "--curve scores the checkpoints in each job's"),
])
def test_bad_arguments_are_refused_naming_the_flag_before_anything_runs(tmp_path, change, flag):
    base = argparse.Namespace(out=str(tmp_path / "out"), jobs=["sync", "sites", "dp"], sites=2,
                              ranks_per_site=2, every=20, steps=300, micro_batch=32, dp_steps=[5, 15],
                              train_samples=12000, set=["cross_site.outer_lr=1.4"])
    bench.check_args(base, 500)  # the defaults pass
    with pytest.raises(ValueError, match=flag):
        bench.run(argparse.Namespace(**{**vars(base), **change}))
    assert not (tmp_path / "out").exists()  # refused before any data was written


def test_bench_fusion_reuse_runs_scores_a_finished_run_without_training_it(tmp_path, monkeypatch):
    """`--reuse-runs`: a recipe whose run folder has summary.json is scored again, not trained; one without
    is trained (and a stage two still starts from the reused run's weights)."""
    from pretrain.bench import fusion

    trained = []
    monkeypatch.setattr(fusion, "_data", lambda *a, **k: {"train": "t", "val": "v", "classnames": []})
    monkeypatch.setattr(fusion, "_score", lambda run_dir, data, rerank: {"scored": run_dir.name})
    monkeypatch.setattr(fusion, "train_ours",
                        lambda overrides, run_dir: trained.append((run_dir.name, overrides)) or ({}, 1.0))
    first = tmp_path / "out" / "runs" / "seed0" / "contrastive"
    first.mkdir(parents=True)
    (first / "summary.json").write_text(json.dumps({"samples_per_s": 5.0}))
    args = argparse.Namespace(out=str(tmp_path / "out"), seeds=[0], recipes=["contrastive", "frozen-towers"],
                              steps=3, frozen_steps=0, batch_size=8, train_samples=8, val_samples=8, rerank=2,
                              image_size=32, set=[], reuse_runs=True)
    rows = fusion.run(args)["rows"]
    assert [name for name, _ in trained] == ["frozen-towers"]
    assert ["--init-from", str(first)] == trained[0][1][:2]
    assert rows[0]["train_wall_s"] is None and rows[0]["samples_per_s"] == 5.0
    assert rows[1]["train_wall_s"] == 1.0
    args.reuse_runs = False
    trained.clear()
    fusion.run(args)
    assert [name for name, _ in trained] == ["contrastive", "frozen-towers"]


def test_bench_fusion_refuses_a_set_of_its_own_keys_before_writing(tmp_path):
    from pretrain.bench import fusion

    args = argparse.Namespace(out=str(tmp_path / "out"), seeds=[0], recipes=["fusion"], steps=3, batch_size=8,
                              train_samples=8, val_samples=8, rerank=2, image_size=32,
                              set=["objectives.itm.weight=1", "model.image_size=64"])
    with pytest.raises(ValueError, match="--set model.image_size: use --image-size"):
        fusion.run(args)
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_train_samples_retrains_the_tokenizer_on_the_new_shards(tmp_path):
    """Rerunning into the same --out reuses the data; another --train-samples rewrites the train shards, and
    the tokenizer must then be the one trained on them, not the earlier run's."""
    from data_pipelines.tokenizer import train_tokenizer_from_shards
    from pretrain.config import embedded_config_path, load_config

    first = bench._data(tmp_path, 500)
    tok = tmp_path / "data" / "tokenizer.json"
    kept = tok.read_text()
    assert bench._data(tmp_path, 500)["tokenizer"] == str(tok) and tok.read_text() == kept  # reused
    second = bench._data(tmp_path, 1000)
    assert (first["shards"], second["shards"]) == (1, 2)
    cfg = load_config(embedded_config_path("demo.yaml"), [])
    fresh = train_tokenizer_from_shards(second["urls"], cfg.data.vocab_size, cfg.data.tokenizer_samples)
    fresh.save(tmp_path / "fresh.json")
    assert tok.read_text() == (tmp_path / "fresh.json").read_text()
    assert kept != tok.read_text()  # the two shard sets do train different tokenizers: the check can fail
