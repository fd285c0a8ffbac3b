"""CLIP's logit-scale ceiling is applied to the parameter after each optimizer step (as CLIP and open_clip
do), through the real DeepSpeed engine at every ZeRO stage and precision: the parameter never ends a step
above the ceiling, in the fp32 master copy the optimizer updates and in the working copy, and once the loss
wants a lower scale it comes back down. With a clamp inside forward instead, the gradient above the ceiling
is zero, Adam's momentum carries the parameter past it and it stays there, frozen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scale_engine import preamble

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = preamble(100.0) + r"""

def value(p):
    master = safe_get_full_fp32_param(p)
    import deepspeed, contextlib
    ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
    with ctx:
        work = float(p.data.float().reshape(-1)[0])
    return (float(master.reshape(-1)[0]) if master is not None else work), work


def trace_of(stage, precision, threshold):
    engine, p = engine_for(stage, precision, threshold)
    trace = []
    for sign in [-1.0] * 6 + [1.0] * 14:  # the loss first wants a larger scale, then a smaller one
        loss = engine(torch.tensor(sign))
        engine.backward(loss)
        engine.step()
        clamp_parameter_(p, CEIL)
        trace.append(value(p))
    return trace


groups.init_distributed(600, 1)
# one engine per configuration, each on its own fresh module, in this one process (as tests/engines.py)
print(json.dumps({"ceil": CEIL, "traces": [trace_of(*case) for case in json.loads(sys.argv[1])]}))
"""


CASES = [(0, "fp32", 0), (2, "bf16", 0), (3, "bf16", 0), (3, "bf16", 10000), (3, "fp32", 0)]


@pytest.fixture(scope="module")
def traces() -> dict[tuple, tuple[float, list]]:
    """(stage, precision, threshold) -> (ceiling, trace): every case's engine in one child process."""
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {case: (res["ceil"], trace) for case, trace in zip(CASES, res["traces"], strict=True)}


@pytest.mark.parametrize("stage,precision,threshold", CASES)
def test_ceiling_holds_and_the_scale_comes_back_down(traces, stage, precision, threshold):
    ceil, trace = traces[stage, precision, threshold]
    for master, work in trace:  # the bf16 working copy too: clamped to the largest bf16 <= log(max)
        assert master <= ceil + 1e-6 and work <= ceil + 1e-6, trace
    assert trace[5][0] == pytest.approx(ceil, abs=1e-6)  # pushed up: it sits at the ceiling
    assert trace[-1][0] < ceil - 0.2, trace  # the loss wants it lower: it came back down


@pytest.mark.parametrize("threshold", [0, 10000])
def test_training_on_two_ranks_keeps_the_scale_at_most_its_ceiling(tmp_path, threshold):
    """The training loop's clamp on 2 ZeRO-3 ranks, with the logit scale partitioned (threshold 0: one element
    over two ranks, one of them padding) and persistent (the default threshold)."""
    from tiny import run_pretrain, train_args, write_micro_shards

    from pretrain.metrics import read_metrics

    shards = write_micro_shards(tmp_path / "shards")
    run = tmp_path / "run"
    r = run_pretrain(["train", *train_args(shards, run, 4, "objectives.contrastive.max_logit_scale=10",
                                           f"parallel.persistence_threshold={threshold}")], procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    temperatures = [row["temperature"] for row in read_metrics(run) if "temperature" in row]
    assert len(temperatures) == 4 and min(temperatures) >= 0.1 - 1e-6, temperatures
