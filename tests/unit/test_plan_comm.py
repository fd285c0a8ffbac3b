"""`pretrain plan --comm`: the shape of the communication model (the numbers are checked against DeepSpeed's
comms logger in tests/e2e/test_plan_comm.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from pretrain.config import embedded_config_path, load_config
from pretrain.plan.comm import comm_plan

COUNTS = {"per_tp_rank": 1_000_000, "persistent_per_tp_rank": 10_000, "frozen_per_tp_rank": 0}


def test_one_rank_sends_nothing_and_zero3_grows_towards_twice_the_model():
    cfg = load_config(embedded_config_path(), ["train.precision=bf16"])
    assert comm_plan(cfg, COUNTS, world=1)["total_bytes"] == 0
    rows = [comm_plan(cfg, COUNTS, world=n)["per_rank_bytes"] for n in (2, 8, 64)]
    gathers = [r["zero3_param_allgather"] for r in rows]
    assert gathers == sorted(gathers) and gathers[-1] < 990_000 * 2  # (dp-1)/dp of the bf16 partitioned bytes
    assert rows[0]["zero3_param_allgather"] == 990_000 * 2 // 2


def test_tp_rows_only_with_tp_and_checkpointing_adds_recompute():
    base = ["parallel.tp=2"]
    plain = comm_plan(load_config(embedded_config_path(), base), COUNTS, world=4)["per_rank_bytes"]
    ckpt = comm_plan(load_config(embedded_config_path(), [*base, "train.activation_checkpointing=true"]),
                     COUNTS, world=4)["per_rank_bytes"]
    assert ckpt["tp_activation_allreduce"] > plain["tp_activation_allreduce"]
    assert "tp_activation_allreduce" not in comm_plan(load_config(embedded_config_path(), []), COUNTS,
                                                      world=4)["per_rank_bytes"]


def test_cli_json_has_comm_and_time_at_bandwidth():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "plan", "--world", "8", "--net-gbps", "100",
                          "--json"], capture_output=True, text=True, check=True).stdout
    comm = json.loads(out)["comm"]
    assert comm["seconds_at_net"] == comm["total_bytes"] * 8 / 100e9 and comm["dp"] == 8
