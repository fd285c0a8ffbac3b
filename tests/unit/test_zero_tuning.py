"""ZeRO bucket/liveness sizes derived from the model, explicit settings winning, and the ZeRO++ switches'
config checks (issue #17). The switches' training runs are in tests/e2e/test_zeropp.py."""

from __future__ import annotations

import pytest

from parallel.engine import LIVE_DEFAULT, deepspeed_config, zero3_tuning
from parallel.settings import ParallelConfig
from pretrain.config import (
    ConfigError,
    check_runtime,
    embedded_config_path,
    engine_spec,
    load_config,
    validate,
)


def test_derived_from_the_widest_tower_and_the_parameter_count():
    t = zero3_tuning(ParallelConfig(persistence_threshold=-1), hidden=768, model_params=2 * 10**9)
    assert t["reduce_bucket_size"] == 5 * 10**8  # a big model: DeepSpeed's default buckets
    assert t["stage3_prefetch_bucket_size"] == 5 * 10**7
    assert t["stage3_param_persistence_threshold"] == 7680
    small = zero3_tuning(ParallelConfig(), hidden=64, model_params=270_000)  # one bucket, not 66 of 64^2
    assert small["reduce_bucket_size"] == small["stage3_prefetch_bucket_size"] == 270_000
    wide = zero3_tuning(ParallelConfig(), hidden=8192, model_params=2 * 10**9)  # W^2 above the default
    assert wide["reduce_bucket_size"] == 5 * 10**8
    assert wide["stage3_prefetch_bucket_size"] == int(0.9 * 8192**2)
    assert t["stage3_max_live_parameters"] == t["stage3_max_reuse_distance"] == 2 * 10**9
    assert zero3_tuning(ParallelConfig(), 768, 10**6)["stage3_max_live_parameters"] == LIVE_DEFAULT


def test_explicit_settings_win():
    p = ParallelConfig(persistence_threshold=123, prefetch_bucket_size=7, reduce_bucket_size=9,
                       max_live_parameters=11)
    assert zero3_tuning(p, 768, 10**12) == {
        "reduce_bucket_size": 9, "stage3_prefetch_bucket_size": 7, "stage3_param_persistence_threshold": 123,
        "stage3_max_live_parameters": 11, "stage3_max_reuse_distance": 11}


def test_deepspeed_config_carries_tuning_and_zeropp_switches():
    zpp = ["parallel.zero_hpz=2", "parallel.zero_quantized_gradients=true"]
    cfg = load_config(embedded_config_path(), zpp)
    zero = deepspeed_config(engine_spec(cfg), 4, "torch", 10**6)["zero_optimization"]
    width = max(cfg.model.vision.width, cfg.model.text.width)
    assert zero["zero_hpz_partition_size"] == 2 and zero["zero_quantized_gradients"] is True
    assert "zero_quantized_weights" not in zero and zero["reduce_bucket_size"] == max(width ** 2, 10**6)
    plain_cfg = load_config(embedded_config_path(), [])
    plain = deepspeed_config(engine_spec(plain_cfg), 4, "torch")["zero_optimization"]
    assert "zero_hpz_partition_size" not in plain


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.zero_hpz=3"], "parallel.zero_hpz (3) must divide the data-parallel degree (4"),
    (["parallel.zero_stage=2", "parallel.zero_quantized_weights=true"], "need parallel.zero_stage=3"),
    (["parallel.max_live_parameters=-5"], "parallel.max_live_parameters must be >= 0"),
])
def test_zeropp_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config(embedded_config_path(), overrides), world_size=4)


def test_quantized_weights_need_cuda():
    import torch

    cfg = load_config(embedded_config_path(), ["parallel.zero_quantized_weights=true", "optim.impl=torch"])
    if torch.cuda.is_available():
        pytest.skip("CUDA present: qwZ can run")
    with pytest.raises(ConfigError, match="zero_quantized_weights=true needs CUDA"):
        check_runtime(cfg)
