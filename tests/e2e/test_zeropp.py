"""ZeRO++ switches against the plain ZeRO-3 path on CPU ranks (gloo), issue #17. Marked slow.

- `parallel.zero_hpz=2` on 4 ranks (two hpZ groups of 2): the same losses as plain ZeRO-3, exactly.
  With the derived liveness limits (parallel/engine.py `zero3_tuning`) the forward's gathers stay live
  through backward, so the secondary partition changes where a re-gather would come from, not the math.
- `parallel.zero_quantized_gradients=true`: DeepSpeed 0.19 quantizes the gradient reduce-scatter only
  across nodes (stage3.py: `all2all_process_group is not None and num_nodes > 1`); on one node it is the
  plain reduce-scatter, which this run checks (same losses). The multi-node int4 path is not run here.
- `parallel.zero_quantized_weights=true` cannot run on CPU (no quantizer kernel); it is refused up front
  by `check_runtime` (tests/unit/test_zero_tuning.py).
"""

from __future__ import annotations

import pytest
from tiny import TINY, run_pretrain

from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow


def _losses(shards, run, *extra):
    r = run_pretrain(["train", f"data.train={shards['train']}", f"run.dir={run}", *TINY, "train.steps=3",
                      "logging.tensorboard=false", *extra], procs=4)
    assert r.returncode == 0, r.stderr[-3000:]
    return [(row["step"], row["loss"], row["grad_norm"]) for row in read_metrics(run) if "loss" in row]


def test_hpz_and_single_node_qgz_match_plain_zero3(shards, tmp_path):
    plain = _losses(shards, tmp_path / "plain")
    zpp = _losses(shards, tmp_path / "zpp", "parallel.zero_hpz=2", "parallel.zero_quantized_gradients=true")
    assert [s for s, *_ in plain] == [1, 2, 3]
    assert zpp == plain
