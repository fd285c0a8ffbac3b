"""`pretrain bench loss` and `pretrain bench step` run end to end on tiny sizes and print one JSON object
with the promised keys; the computed memory model says what the tiled loss is for.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_bench_cli.py.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # one DeepSpeed bench process per variant (~6-8 s each on CPU)
def test_bench_gpu_script_tiny_cpu_appends_a_row_for_every_variant(tmp_path):
    """`scripts/bench_gpu.py --device cpu --tiny` (what `make bench-gpu` runs on a GPU, at tiny size): every
    variant gets a row, measured or "unavailable: <reason>" (apex, CUDA-only kernels), never a crash.

    `--skip compile`: the two compile rows and the compile in "all available fusions" took ~90 s of the
    script's 174 s (inductor on CPU; docs/benchmarks.md, "Test-suite time and where it goes"); compiled
    engine runs against eager, per block and whole model, are checked in tests/e2e/test_fused_paths.py. Here
    they get their "skipped" rows, and "all available fusions" then leaves compile out, as it does for any
    row that did not run.

    `--steps 1 --warmup 0`: what is checked is that each variant runs and lands in the table, not its
    speed; every variant still trains one timed step (the baseline's open_clip runs too). ~10% of the test's
    CPU time saved at one intra-op thread (as under `make test`); the warm-up loop is run by
    tests/unit/test_bench_cli.py's `bench step`."""
    import subprocess
    import sys

    from tiny import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gpu import ALL_FUSIONS, variants

    doc = tmp_path / "benchmarks.md"
    before = (ROOT / "docs" / "benchmarks.md").read_text()
    doc.write_text(before)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu", "--tiny",
           "--out", str(doc), "--json-out", str(tmp_path / "v.json"), "--skip", "compile",
           "--steps", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    text = doc.read_text()
    assert text.startswith(before)
    added = text[len(before):]
    assert "`make bench-gpu`" in added and "commit " in added and "| variant | samples/s |" in added
    rows = {line.split("|")[1].strip(): line for line in added.splitlines() if line.startswith("| ")}
    for name, _ in variants(tiny=True):
        match = [r for n, r in rows.items() if n == name or (name == ALL_FUSIONS and n.startswith(name))]
        assert len(match) == 1, (name, list(rows))
        status = match[0].rstrip(" |").split("|")[-1].strip()
        if "compile" in name:
            assert status == "skipped: --skip compile", match[0]
        else:
            assert status == "ok" or status.startswith("unavailable: "), match[0]
    assert "ok" in rows["baseline (+ open_clip)"]
    fused = next(n for n in rows if n.startswith(ALL_FUSIONS))
    assert "optim.impl=auto" in fused and "compile" not in fused, fused  # only rows that ran are combined
    assert "open_clip baseline (full images)" in rows and "open_clip, patch_dropout=0.5" in rows
    data = json.loads((tmp_path / "v.json").read_text())
    assert len(data["variants"]) == len(variants(tiny=True)) and data["meta"]["commit"]
    assert "--skip compile" in data["meta"]["command"]
    assert all(v["steps"] == 1 and v["warmup_steps"] == 0 for v in data["variants"] if v["status"] == "ok")
