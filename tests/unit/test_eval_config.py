"""eval.* and checkpoint.keep_best are checked with the rest of the config, each error naming its keys."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.synth import write_synthetic_shards
from pretrain.config import ConfigError, embedded_config_path, load_config
from pretrain.evaluation.validate import Validator

VAL = "data.val=/nowhere/shard-000000.tar"


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(embedded_config_path(), list(overrides))
    return str(e.value)


def test_validation_needs_held_out_shards():
    assert "data.val" in _problems("eval.every=10")
    assert "data.val" in _problems("eval.at_end=true")


def test_keep_best_needs_validation_and_a_val_metric():
    assert "checkpoint.keep_best needs eval.every" in _problems(VAL, "checkpoint.keep_best=val/loss")
    assert "is not a validation metric" in _problems(VAL, "eval.every=5", "checkpoint.keep_best=loss")


def test_keep_best_needs_every_checkpoint_validated():
    msg = _problems(VAL, "eval.every=3", "checkpoint.every=10", "checkpoint.keep_best=val/i2t_r1")
    assert "checkpoint.every (10) must be a multiple of eval.every (3)" in msg
    load_config(embedded_config_path(), [VAL, "eval.every=5", "checkpoint.every=10",
                                         "checkpoint.keep_best=val/i2t_r1"])


def test_negative_values_are_named_together():
    msg = _problems("eval.every=-1", "eval.max_samples=-2", "eval.batch_size=-3")
    assert all(f"eval.{k} must be >= 0" in msg for k in ("every", "max_samples", "batch_size"))


def test_keep_best_zero_shot_without_classnames_is_refused(tmp_path, tiny_tok):
    out = write_synthetic_shards(tmp_path, samples=4, samples_per_shard=4, image_size=16, seed=0)
    (tmp_path / "classnames.txt").unlink()
    cfg = load_config(embedded_config_path(), [f"data.val={out['urls']}", "eval.every=5",
                                               "checkpoint.keep_best=val/zeroshot_top1"])
    with pytest.raises(ConfigError, match="checkpoint.keep_best.*eval.classnames"):
        Validator(cfg, tiny_tok, torch.nn.Linear(1, 1), lambda b: b, torch.float32)
    (tmp_path / "classnames.txt").write_text("a\nb\n")  # beside the shards: found, accepted
    v = Validator(cfg, tiny_tok, torch.nn.Linear(1, 1), lambda b: b, torch.float32)
    assert v.classnames == ["a", "b"] and v.due(5) and not v.due(6)
