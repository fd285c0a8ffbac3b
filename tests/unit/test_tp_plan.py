"""Fast checks of the tensor-parallel plumbing that need no second rank: config validation for tp, the
memory plan (`pretrain plan`) and its byte accounting, joining TP checkpoint slices, the mpu adapter."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist

from parallel import groups
from pretrain.checkpoint.tp_split import merge_tp_slices
from pretrain.cli import main
from pretrain.config import ConfigError, load_config, validate
from pretrain.models import PretrainModel
from pretrain.parallelize import tp_split_dims
from pretrain.plan.memory import bytes_per_param, count_params, memory_plan

TINY = ["model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=4", "model.text.width=32", "model.text.layers=1", "model.text.heads=4",
        "model.text.context_length=8", "model.embed_dim=16", "model.decoder.width=16",
        "model.decoder.layers=1", "model.decoder.heads=2", "data.vocab_size=100"]


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("override,needle", [
    ("model.text.heads=3", "model.text.heads (3) must be divisible by parallel.tp (2)"),
    ("model.vision.heads=1", "model.vision.heads (1) must be divisible by parallel.tp (2)"),
    ("model.vocab_pad_multiple=63", "model.vocab_pad_multiple (63) must be divisible by parallel.tp (2)"),
    ("model.mlp_ratio=1.03125", "MLP width 33"),
])
def test_tp_divisibility_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*TINY, "parallel.tp=2", override])
    assert needle in str(e.value)


def test_world_size_must_be_a_multiple_of_tp():
    cfg = load_config(None, [*TINY, "parallel.tp=2"])
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tp \(2\)"):
        validate(cfg, world_size=3)


def test_decoder_heads_do_not_matter_without_the_decoder():
    load_config(None, [*TINY, "parallel.tp=2", "model.decoder.heads=1", "objectives.mim.weight=0"])


# ------------------------------------------------------------------------------------------- plan
def test_split_parameters_are_tagged_and_counted_on_the_meta_device():
    cfg = load_config(None, TINY)
    with torch.device("meta"):
        meta = PretrainModel(cfg.model, cfg.objectives, vocab_size=100)
    torch.manual_seed(0)
    real = PretrainModel(cfg.model, cfg.objectives, vocab_size=100)
    assert all(p.is_meta for p in meta.parameters())
    c = count_params(meta, tp=2)
    assert c["total"] == sum(p.numel() for p in real.parameters())
    split = {n for n, d in tp_split_dims(real).items() if d is not None}
    assert tp_split_dims(meta) == tp_split_dims(real)
    assert c["split"] == sum(p.numel() for n, p in real.named_parameters() if n in split)
    assert c["per_tp_rank"] == c["replicated"] + c["split"] // 2
    assert "text.token_embedding.weight" in split and "mlm_head.decoder.bias" in split
    assert "visual.transformer.resblocks.0.attn.proj.weight" in split
    assert "visual.transformer.resblocks.0.attn.proj.bias" not in split  # row bias: added after the sum
    assert "visual.conv1.weight" not in split and "logit_scale" not in split


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_bytes_follow_zero_stage_and_precision(stage, precision):
    cfg = load_config(None, [*TINY, "parallel.tp=2", f"parallel.zero_stage={stage}",
                             f"train.precision={precision}", "parallel.persistence_threshold=0"])
    plan = memory_plan(cfg, world=8)
    mine, dp = plan["params"]["per_tp_rank"], 4
    pb, gb, ob = bytes_per_param(precision, stage)
    assert (pb, gb, ob) == ((4, 4, 8 if stage == 0 else 12) if precision == "fp32" else (2, 2, 12))
    r = plan["per_rank_bytes"]
    assert r["params"] == pytest.approx(pb * mine / (dp if stage == 3 else 1), abs=1)
    assert r["grads"] == pytest.approx(gb * mine / (dp if stage >= 2 else 1), abs=1)
    assert r["optimizer"] == pytest.approx(ob * mine / (dp if stage >= 1 else 1), abs=1)
    assert plan["total_bytes"] == plan["params"]["total"] * (pb + gb + ob)
    assert plan["vocab_padded"] == 128


def test_persistent_parameters_stay_whole_under_zero3():
    base = [*TINY, "parallel.tp=2", "parallel.zero_stage=3"]
    none = memory_plan(load_config(None, [*base, "parallel.persistence_threshold=0"]), world=8)
    some = memory_plan(load_config(None, [*base, "parallel.persistence_threshold=1000"]), world=8)
    kept = some["params"]["persistent_per_tp_rank"]
    assert kept > 0
    extra = some["per_rank_bytes"]["params"] - none["per_rank_bytes"]["params"]
    assert extra == pytest.approx(2 * kept, abs=2)  # bf16: a whole copy next to the 1/dp partition


def test_plan_cli_table_json_and_errors(capsys):
    assert main(["plan", "--world", "4", *TINY, "parallel.tp=2"]) == 0
    table = capsys.readouterr().out
    assert "world 4 = tp 2 x dp 2, ZeRO-3" in table and "per TP rank" in table and "optimizer" in table
    assert main(["plan", "--world", "4", "--json", *TINY, "parallel.tp=2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["tp"], plan["dp"]) == (2, 2)
    assert main(["plan", "--world", "3", *TINY, "parallel.tp=2"]) == 2
    assert "not divisible by parallel.tp" in capsys.readouterr().err


def test_tp2_recipe_plans_a_billion_parameter_model_at_a_sixteenth_per_rank(capsys):
    from pretrain.config import embedded_config_path

    cfg = load_config(embedded_config_path("tp2.yaml"))
    assert cfg.parallel.tp == 2
    plan = memory_plan(cfg, world=16)
    assert plan["params"]["total"] > 1e9
    assert plan["per_rank_bytes"]["total"] == pytest.approx(plan["total_bytes"] / 16, rel=0.05)


# ------------------------------------------------------------------------------------ checkpoints
def test_merge_tp_slices_joins_along_the_split_dimension():
    full = {"col.weight": torch.arange(24.).view(6, 4), "row.weight": torch.arange(24.).view(4, 6),
            "bias": torch.arange(4.), "emb.weight": torch.arange(12.).view(6, 2)}
    slices = [{"col.weight": full["col.weight"][3 * t:3 * t + 3],
               "row.weight": full["row.weight"][:, 3 * t:3 * t + 3], "bias": full["bias"],
               "emb.weight": full["emb.weight"][3 * t:3 * t + 3], "lin._extra_state": None}
              for t in range(2)]
    out = merge_tp_slices(slices, {k: v.shape for k, v in full.items()})
    assert set(out) == set(full)
    for k, v in full.items():
        assert torch.equal(out[k], v), k
    with pytest.raises(ValueError, match="not 1/2"):
        merge_tp_slices([{"w": torch.zeros(2, 2)}] * 2, {"w": torch.Size([5, 2])})


# ------------------------------------------------------------------------------------------- mpu
def test_mpu_adapter_answers_what_deepspeed_asks(tmp_path):
    from parallel.mpu import MegatronMPU

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        groups.init_model_parallel(1)
        mpu = MegatronMPU()
        assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == 1
        assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_rank() == 0
        assert mpu.get_data_parallel_group() is groups.get_data_parallel_group()
        assert mpu.get_model_parallel_group() is groups.get_tensor_parallel_group()
        assert mpu.get_data_parallel_group_ranks() == [0]
        assert not hasattr(mpu, "get_sequence_parallel_world_size")  # DeepSpeed would switch code paths
        with pytest.raises(ValueError, match="not divisible"):
            groups.init_model_parallel(1 + 1)  # world 1 cannot hold tp=2
    finally:
        groups.destroy_model_parallel()
        dist.destroy_process_group()
