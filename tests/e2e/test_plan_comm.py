"""`pretrain plan --comm` against DeepSpeed's comms logger (issue #17): real ZeRO training on 2 and 4 CPU
ranks (gloo), the logger's record of one steady-state step (parallel/comms_probe.py, MMPT_COMMS_LOG)
against the plan for the same model (its parameter counts from the run's memory.json, since the trained
tokenizer sets the vocabulary), op by op and in bytes sent, within 10%. Marked slow.

The 4-rank run is the session's shared plain ZeRO-3 run (tiny.plain_zero3_4ranks), which test_zeropp.py
also compares the ZeRO++ switches against; every step is logged (our logging collectives go through
torch.distributed, which the comms logger does not see)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import COMMS_LOG, PLAIN_ZERO3

from pretrain.config import embedded_config_path, load_config
from pretrain.plan.comm import comm_plan

pytestmark = pytest.mark.slow
STEP = "3"  # steps 1-2 trace ZeRO-3's fetch order and broadcast once; step 3 is what every later step does


def _sent_from_logger(ops: dict[str, dict[str, int]], n: int) -> float:
    """Bytes a rank sends for the logged ops: the logger records each op's input size (see comms_probe)."""
    factor = {"all_gather_into_tensor": n - 1, "reduce_scatter_tensor": (n - 1) / n,
              "all_reduce": 2 * (n - 1) / n}
    return sum(v["msg_bytes"] * factor[k] for k, v in ops.items())


@pytest.mark.parametrize("procs,extra", [
    (2, ["train.grad_accum=2", "parallel.persistence_threshold=10000"]),  # persistent params, accumulation
    (4, []),  # TINY's persistence threshold 0: the shared plain run (tiny.plain_zero3_4ranks)
])
def test_plan_comm_matches_deepspeed_comms_logger(shards, trained_once, procs, extra):
    args = [*PLAIN_ZERO3, *extra]
    run = trained_once([f"data.train={shards['train']}", *args], procs=procs, env=COMMS_LOG)
    comms = run.parent / "comms"
    counts = json.loads((run / "memory.json").read_text())["plan"]["params"]
    plan = comm_plan(load_config(embedded_config_path(), args), counts, world=procs)
    zero_rows = {k: v for k, v in plan["per_rank_bytes"].items() if k.startswith(("zero", "small"))}
    for rank in range(procs):
        logged = json.loads(Path(f"{comms}.rank{rank}.json").read_text())[STEP]
        assert set(logged) == set(plan["logger_msg_bytes"]), (logged, plan["logger_msg_bytes"])
        for op, v in logged.items():
            assert v["msg_bytes"] == pytest.approx(plan["logger_msg_bytes"][op], rel=0.10), (op, logged, plan)
        assert _sent_from_logger(logged, procs) == pytest.approx(sum(zero_rows.values()), rel=0.10)
