"""`pretrain bench loss` and `pretrain bench step` run end to end on tiny sizes and print one JSON object
with the promised keys; the computed memory model says what the tiled loss is for.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_bench_cli.py.
"""

from __future__ import annotations

import json

import pytest
from tiny import MICRO, run_pretrain

from pretrain.bench.loss import computed_peak_bytes


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_loss_measures_both_variants_in_fresh_processes():
    # 4096 rows: the plain loss's logits (64 MiB each) dwarf allocator and thread-pool noise in the RSS
    # of a fresh process; at 1024 rows (4 MiB) the measurement flickered on a loaded 2-core machine.
    res = _json(run_pretrain(["bench", "loss", "--batch", "4096", "--dim", "16", "--chunk", "128",
                              "--json"], timeout=180))
    assert {"batch", "dim", "chunk", "loss", "device", "variants", "ratio", "target_met"} <= set(res)
    plain, tiled = res["variants"]["plain"], res["variants"]["tiled"]
    for row in (plain, tiled):
        assert row["source"] == "measured" and row["peak_bytes"] > 0 and row["computed_bytes"] > 0
    assert tiled["chunk"] == 128 and plain["chunk"] == 0
    assert res["loss_abs_diff"] < 1e-4  # same loss value, two implementations
    # 4096^2 fp32 logits are 64 MiB each: the plain loss must show several of them, the tiled one not
    assert plain["peak_bytes"] > 3 * 2**26 and tiled["peak_bytes"] < plain["peak_bytes"] / 2


def test_bench_loss_reports_computed_where_not_measured():
    res = _json(run_pretrain(["bench", "loss", "--batch", "65536", "--dim", "512", "--loss", "siglip",
                              "--measure-max-batch", "0", "--json"], timeout=60))
    assert all(v["source"] == "computed" and "why" in v for v in res["variants"].values())
    assert res["variants"]["plain"]["peak_bytes"] == computed_peak_bytes("plain", 65536, 512, 1024, "siglip")
    assert res["target_met"] and res["ratio"] <= 1 / 20


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_computed_model_target_at_65536(loss):
    """The issue's size: the plain logits cannot exist on most machines, so the ratio is computed."""
    plain = computed_peak_bytes("plain", 65536, 512, 1024, loss)
    tiled = computed_peak_bytes("tiled", 65536, 512, 1024, loss)
    assert plain >= 4 * 65536 ** 2 * 4 and tiled <= plain / 20


def test_bench_step_prints_throughput_split_memory_flops_and_mfu():
    overrides = [o for o in MICRO if not o.startswith(("data.", "logging."))]
    res = _json(run_pretrain(["bench", "step", "--steps", "2", "--warmup", "1", "--json", *overrides],
                             timeout=240))
    assert res["samples"] == 2 * 4 and res["samples_per_s"] > 0
    assert set(res["time_s"]) == {"data", "forward", "backward", "optimizer", "communication"}
    assert res["time_s"]["communication"] == 0.0 and "single process" in res["communication_note"]
    assert sum(res["time_s"].values()) <= res["wall_s"] * 1.01
    assert res["time_s"]["forward"] > 0 and res["time_s"]["backward"] > 0
    assert res["memory"]["peak_bytes"] > 0 and "measured" in res["memory"]["how"]
    assert res["flops_per_sample"] == 3 * res["flops_forward_per_sample"] > 0
    assert res["flops_forward_per_sample"] == sum(res["flops_parts"].values())
    assert res["peak_source"].startswith("measured fp32 matmul") and res["peak_flops_per_s"] > 1e8
    expect = res["flops_per_sample"] * res["samples_per_s"] / res["peak_flops_per_s"]
    assert res["mfu"] == pytest.approx(expect, rel=1e-3, abs=1e-5) and 0 < res["mfu"] < 1
    assert res["parameters"] > 0


def test_all_fusions_take_the_whole_model_compile_only_where_it_measured_faster():
    """scripts/bench_gpu.py: "all available fusions" adds `train.compile_scope=model` only when that variant
    ran and beat the per-block compile in the same run."""
    import sys

    from tiny import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gpu import WHOLE_COMPILE, whole_compile_faster

    def ok(name: str, rate: float) -> dict:
        return {"name": name, "status": "ok", "samples_per_s": rate}

    assert whole_compile_faster([ok("train.compile=true", 10.0), ok(WHOLE_COMPILE, 12.0)])
    assert not whole_compile_faster([ok("train.compile=true", 12.0), ok(WHOLE_COMPILE, 10.0)])
    failed = {"name": WHOLE_COMPILE, "status": "failed: x"}
    assert not whole_compile_faster([ok("train.compile=true", 10.0), failed])
    assert not whole_compile_faster([ok(WHOLE_COMPILE, 12.0)])  # no per-block row: nothing to beat



@pytest.mark.parametrize("flag, args", [
    ("--only", ["--only", "no-such-variant"]),
    # with one variant that cannot run on a CPU selected, so even a missing check fails in a second
    ("--skip", ["--only", "optim.impl=apex_fused", "--skip", "compile", "no-such-variant"])])
def test_bench_gpu_pattern_matching_no_variant_is_refused_before_anything_runs(flag, args, tmp_path, capsys):
    """scripts/bench_gpu.py: `--skip compiled` (a typo) would silently skip nothing, and an `--only` that
    matches nothing would append an empty table to docs/benchmarks.md; both stop first, naming the pattern."""
    import sys

    from tiny import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gpu import main

    out = tmp_path / "benchmarks.md"
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--tiny", "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} no-such-variant: no variant name contains it" in err  # only the unmatched pattern
    assert "train.compile=true" in err  # the names to choose from
    assert not out.exists()


def test_bench_step_refuses_a_fine_tune_config_it_would_not_time(capsys):
    """`bench step` builds the pretraining model and counts its FLOPs; under train.task=classify it would
    print a pretraining model's throughput and MFU as the fine-tune's: refused, naming the key."""
    from pretrain.cli import main

    assert main(["bench", "step", "--steps", "1", "train.task=classify", "finetune.classnames=c.txt"]) == 2
    err = capsys.readouterr().err
    assert "train.task='classify'" in err and "pretrain plan --world N train.task=classify" in err
