"""`pretrain plan --gpu-mem GB`: the activation estimate, the workspace and the largest micro-batch that fits,
and the estimate checked against measured peaks of a real forward + backward on CPU.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_plan_memory.py.
"""

from __future__ import annotations

import json

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.plan.activations import (
    DS_PREFETCH_BUCKET_SIZE,
    DS_REDUCE_BUCKET_SIZE,
    block_activation_bytes,
    max_micro_batch,
    total_bytes_at,
)
from pretrain.plan.memory import bytes_per_param, memory_plan

TINY = ["model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=4", "model.text.width=32", "model.text.layers=1", "model.text.heads=4",
        "model.text.context_length=8", "model.embed_dim=16", "model.decoder.width=16",
        "model.decoder.layers=1", "model.decoder.heads=2", "data.vocab_size=100"]


# ------------------------------------------------------------------------------------ formulas
def test_block_bytes_follow_the_documented_counts():
    W, T, h = 64, 10, 4
    sdpa = block_activation_bytes(W, T, h, 4.0, residual=4, compute=4)
    # 2 TW r + 2 TW c + 3 TW c + TW c (proj input) + TW c + 4hT (sdpa) + 2 T H c + 16 T
    assert sdpa == 4 * T * W * (2 + 2 + 3 + 1 + 1) + 4 * h * T + 2 * T * 4 * W * 4 + 16 * T
    math = block_activation_bytes(W, T, h, 4.0, residual=4, compute=4, attention="math")
    assert math - sdpa == h * T * T * 4 - (T * W * 4 + 4 * h * T)
    quick = block_activation_bytes(W, T, h, 4.0, residual=4, compute=4, act="quick_gelu")
    assert quick - sdpa == T * 4 * W * 4  # the sigmoid output is kept as well
    tp2 = block_activation_bytes(W, T, h, 4.0, residual=4, compute=4, tp=2)
    assert tp2 < sdpa and tp2 > sdpa / 2  # split: qkv, attention, MLP hidden; replicated: residual, norms
    half = block_activation_bytes(W, T, h, 4.0, residual=2, compute=2)
    assert half < sdpa


def test_deepspeed_bucket_defaults_are_the_ones_planned_for():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig()
    assert z.reduce_bucket_size == DS_REDUCE_BUCKET_SIZE
    assert z.prefetch_bucket_size == DS_PREFETCH_BUCKET_SIZE


def test_bf16_autocast_keeps_fp32_parameters():
    assert bytes_per_param("bf16_autocast", 3) == (4, 4, 12)
    assert bytes_per_param("bf16_autocast", 0) == (4, 4, 8)


# ---------------------------------------------------------------------------------------- plan
def test_plan_has_activation_workspace_and_fit_entries():
    cfg = load_config(None, [*TINY, "train.micro_batch=8"])
    plan = memory_plan(cfg, world=2, gpu_mem_gb=2.0)
    a, w, f = plan["activations"], plan["workspace"], plan["fit"]
    per = a["per_sample_bytes"]
    assert per["checkpointing"] < per["no_checkpointing"]
    for key in ("no_checkpointing", "checkpointing"):
        assert per[key] == sum(a["per_sample_parts"][key].values())
        assert a["at_micro_batch_bytes"][key] == 8 * per[key] + a["contrastive"]["bytes_at_micro_batch"]
    assert {"vision_encoder", "text_causal", "decoder", "text_mlm", "inputs"} <= set(a["per_sample_parts"][
        "no_checkpointing"])
    assert a["contrastive"]["columns_per_row"] == 8 * 2  # micro-batch x dp
    # the bucket the engine derives for this model (parallel/engine.py's zero3_tuning: the model's size
    # while it is under DeepSpeed's default), bf16 gradients
    mine = plan["params"]["per_tp_rank"]
    assert w["zero_buffers"]["reduce_bucket"] == min(mine, DS_REDUCE_BUCKET_SIZE) * 2 < DS_REDUCE_BUCKET_SIZE
    for ckpt, key in ((False, "no_checkpointing"), (True, "checkpointing")):
        n = f["max_micro_batch"][key]
        assert n > 0
        budget = f["gpu_mem_bytes"]
        assert total_bytes_at(plan, cfg, n, ckpt) <= budget < total_bytes_at(plan, cfg, n + 1, ckpt)
    assert f["max_micro_batch"]["checkpointing"] > f["max_micro_batch"]["no_checkpointing"]
    assert f["configured"]["fits"] == (f["configured"]["total_bytes"] <= f["gpu_mem_bytes"])


def test_objectives_that_are_off_cost_nothing_and_tiling_removes_the_quadratic_term():
    full = memory_plan(load_config(None, TINY), world=1)["activations"]
    con = memory_plan(load_config(None, [*TINY, "objectives.mim.weight=0", "objectives.mlm.weight=0"]),
                      world=1)["activations"]
    assert set(con["per_sample_parts"]["no_checkpointing"]) == {"inputs", "vision_encoder", "text_causal"}
    assert con["per_sample_bytes"]["no_checkpointing"] < full["per_sample_bytes"]["no_checkpointing"]
    base = [*TINY, "train.micro_batch=4096"]
    plain = memory_plan(load_config(None, base), world=8)["activations"]["contrastive"]
    tiled = memory_plan(load_config(None, [*base, "objectives.contrastive.chunk=256"]), world=8)[
        "activations"]["contrastive"]
    assert plain["bytes_at_micro_batch"] >= 4 * 4096 * 4096 * 8 * 4
    assert tiled["bytes_at_micro_batch"] < plain["bytes_at_micro_batch"] / 20


def test_too_small_a_device_fits_nothing():
    cfg = load_config(None, TINY)
    plan = memory_plan(cfg, world=1)
    assert max_micro_batch(plan, cfg, budget=plan["per_rank_bytes"]["total"], checkpointing=True) == 0


def test_plan_cli_gpu_mem_text_and_json(capsys):
    assert main(["plan", "--world", "2", "--gpu-mem", "4", *TINY]) == 0
    out = capsys.readouterr().out
    assert "activations per sample" in out and "largest micro-batch" in out and "workspace" in out
    assert main(["plan", "--world", "2", "--gpu-mem", "4", "--json", *TINY]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["fit"]["max_micro_batch"]) == {"no_checkpointing", "checkpointing"}
    assert main(["plan", "--world", "2", "--json", *TINY]) == 0
    assert "fit" not in json.loads(capsys.readouterr().out)  # only with --gpu-mem
    assert main(["plan", "--world", "2", "--gpu-mem", "0", *TINY]) == 2
    assert "--gpu-mem must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, flag", [
    *[(["--world", w], "--world") for w in ("0", "-2")],
    *[(["--world", "1", f, v], f) for f in ("--gpu-mem", "--net-gbps") for v in ("0", "-1", "nan", "inf")],
])
def test_plan_cli_refuses_impossible_numbers_in_one_line(capsys, args, flag):
    assert main(["plan", *args, *TINY]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"pretrain: error: {flag} must be") and err.count("\n") == 1, err


def test_plan_cli_net_gbps_prints_the_comm_table(capsys):
    assert main(["plan", "--world", "2", "--net-gbps", "0.5", *TINY]) == 0
    assert "Gbit/s, no overlap" in capsys.readouterr().out
