"""ZeRO++ switches against the plain ZeRO-3 path on CPU ranks (gloo), issue #17. Marked slow.

- `parallel.zero_hpz=2` on 4 ranks (two hpZ groups of 2): the same losses as plain ZeRO-3, exactly.
  With the derived liveness limits (parallel/engine.py `zero3_tuning`) the forward's gathers stay live
  through backward, so the secondary partition changes where a re-gather would come from, not the math.
- `parallel.zero_quantized_gradients=true`: DeepSpeed 0.19 quantizes the gradient reduce-scatter only
  across nodes (stage3.py: `all2all_process_group is not None and num_nodes > 1`); on one node it is the
  plain reduce-scatter, which this run checks (same losses). The multi-node int4 path is not run here.
- `parallel.zero_quantized_weights=true` cannot run on CPU (no quantizer kernel); it is refused up front
  by `check_runtime` (tests/unit/test_zero_tuning.py).

The plain run is the session's shared one (tiny.plain_zero3_4ranks, also read by test_plan_comm.py): both
runs train under DeepSpeed's comms logger, so the two switches are the only difference between them.
"""

from __future__ import annotations

import pytest
from tiny import COMMS_LOG, PLAIN_ZERO3, plain_zero3_4ranks, run_pretrain

from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow


def _losses(run):
    return [(row["step"], row["loss"], row["grad_norm"]) for row in read_metrics(run) if "loss" in row]


def test_hpz_and_single_node_qgz_match_plain_zero3(shards, trained_once, tmp_path):
    plain = _losses(plain_zero3_4ranks(trained_once, shards))
    run = tmp_path / "zpp"
    r = run_pretrain(["train", f"run.dir={run}", f"data.train={shards['train']}", *PLAIN_ZERO3,
                      "parallel.zero_hpz=2", "parallel.zero_quantized_gradients=true"], procs=4,
                     env={k: v.replace("{dir}", str(tmp_path)) for k, v in COMMS_LOG.items()})
    assert r.returncode == 0, r.stderr[-3000:]
    zpp = _losses(run)
    assert [s for s, *_ in plain] == [1, 2, 3]
    assert zpp == plain
