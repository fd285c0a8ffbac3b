"""`pretrain bench step --vs open_clip`: the open_clip side is the same CLIP (parameter for parameter), its
numbers and the ratio land in the JSON, and a missing open_clip is a clear error. No timing assertions.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_bench_vs.py.
"""

from __future__ import annotations

import json

import pytest
from tiny import MICRO, run_pretrain


@pytest.mark.slow  # builds a DeepSpeed engine
def test_bench_step_vs_open_clip_json():
    pytest.importorskip("open_clip")
    overrides = [o for o in MICRO if not o.startswith(("data.", "logging."))]
    proc = run_pretrain(["bench", "step", "--steps", "2", "--warmup", "1", "--vs", "open_clip",
                         "--vs-patch-dropout", "0.5", "--json", *overrides], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    vs = res["vs_open_clip"]
    assert {"samples_per_s", "ratio", "parameters", "ours_shared_parameters", "time_s", "library",
            "patch_dropout", "patch_dropout_run", "mfu", "flops_per_sample"} <= set(vs)
    assert vs["ratio"] == pytest.approx(res["samples_per_s"] / vs["samples_per_s"], rel=1e-3)
    pd = vs["patch_dropout_run"]
    assert pd["patch_dropout"] == 0.5 and vs["patch_dropout"] == 0.0
    assert pd["ratio"] == pytest.approx(res["samples_per_s"] / pd["samples_per_s"], rel=1e-3)
    assert vs["parameters"] == vs["ours_shared_parameters"] == pd["parameters"] < res["parameters"]
    assert vs["samples"] == res["samples"]  # same steps x micro-batch
    assert vs["ratio_per_cpu_s"] == pytest.approx(
        (res["samples"] / res["process_cpu_s"]) / (vs["samples"] / vs["process_cpu_s"]), rel=1e-3)
    text = run_pretrain(["bench", "step", "--steps", "1", "--warmup", "0", "--vs", "open_clip", *overrides],
                        timeout=300)
    assert text.returncode == 0, text.stderr[-3000:]
    assert "ours / open_clip =" in text.stdout and "in common" in text.stdout
