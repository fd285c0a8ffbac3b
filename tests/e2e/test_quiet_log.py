"""`make demo`'s whole output holds only lines the project decided to print (launch/logs.py).

Runs `pretrain demo` as the Makefile does (synthetic shards, the deepspeed launcher with 2 CPU ranks,
eval), shortened to 3 steps, and checks every line of stdout and stderr against an explicit allowlist:
a new third-party warning, a rank > 0 INFO line or a stray print fails it, naming the line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from tiny import ROOT

pytestmark = pytest.mark.slow

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
ALLOWED = [re.compile(p) for p in (
    r"\+ \S*deepspeed --num_accelerators 2 .* --module pretrain\.cli train .*",  # the demo's launcher line
    rf"{STAMP} mmpt\.\w+ INFO: .*",  # our log lines (a warning in a plain demo run would be news)
    # the memory plan's table, logged as one multi-line message (pretrain/plan/memory.py)
    r"model states: world \d+ = tp \d+ x dp \d+, ZeRO-\d, \w+ \(.*\)",
    r"  parameters  total [\d,]+  split over TP [\d,]+  replicated [\d,]+  per TP rank [\d,]+",
    r" +per rank +x world",
    r"  (params|grads|optimizer|total) +[\d.]+ \w?i?B +[\d.]+ \w?i?B",
    r"  single-device model states .*",
    r"  measured rank \d+: params .*",
    r"train: +\d+%\|.*\| \d+/\d+ \[.*\]",  # tqdm, one segment per redraw
    r"\{.*\}",  # train's summary (rank 0) and the demo's result: JSON objects, parsed below
)]


def unexpected_lines(output: str) -> list[str]:
    """Lines (tqdm redraws split on \\r) that match no allowlist pattern; blank ones are fine."""
    lines = (seg.rstrip() for line in output.splitlines() for seg in line.split("\r"))
    return [line for line in lines if line.strip() and not any(p.fullmatch(line) for p in ALLOWED)]


def test_unexpected_lines_are_caught():
    """The check itself: the kinds of line this test exists to keep out do not pass the allowlist."""
    noise = ("[2026-12-04 20:07:32,511] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
             "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.\n"
             "[rank1]:W1204 20:07:37.858000 11854 torch/utils/cpp_extension.py:183] No CUDA runtime\n"
             "2026-12-04 20:07:45,185 megatron.core.x INFO: Detected Megatron Core\n"
             "2026-12-04 20:07:45,185 mmpt.train WARNING: stopped at step 2\n"
             "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n")
    assert len(unexpected_lines(noise)) == 5
    assert unexpected_lines("2026-12-04 20:07:45,185 mmpt.train INFO: saved checkpoint x\n\r\n") == []


def test_demo_prints_only_allowlisted_lines(tmp_path):
    t0 = time.monotonic()
    # as `make demo` runs it (the console script is `pretrain.cli:entry`), shortened to 3 steps
    cmd = [sys.executable, "-m", "pretrain.cli", "demo", "--out", str(tmp_path), "train.steps=3",
           "train.micro_batch=16", "data.tokenizer_samples=500", "logging.tensorboard=false",
           "eval.every=3", "eval.max_samples=64"]  # a validation on the live ZeRO-3 model, too
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    bad = unexpected_lines(out)
    assert not bad, "lines nobody decided to print:\n" + "\n".join(bad)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and "zeroshot_top1" in result
    assert list(result["val_zeroshot_top1_by_step"]) == ["3"]  # JSON keys
    assert "rank 0 of 2" in out and "rank 1 of 2" not in out  # ranks > 0: warnings and errors only
    if not torch.cuda.is_available():
        assert out.count("no GPU: training on CPU") == 1
    print(f"demo, 3 steps: {time.monotonic() - t0:.1f} s, {len(out.splitlines())} lines")
