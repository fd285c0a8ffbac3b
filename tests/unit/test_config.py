"""Config loading: YAML + dotted overrides, typed, with errors that name the key."""

import subprocess
import sys

import pytest

from pretrain.config import (
    Config,
    ConfigError,
    config_from_dict,
    embedded_config_path,
    field_help,
    load_config,
    to_dict,
    validate,
)


def test_demo_yaml_loads_and_has_required_keys():
    cfg = load_config(embedded_config_path())
    assert cfg.parallel.zero_stage == 3
    for key in ("data.train", "data.val", "run.dir", "train.steps", "train.micro_batch",
                "parallel.zero_stage", "parallel.tp", "objectives.contrastive.weight",
                "objectives.mim.weight", "objectives.mlm.weight", "model.image_size"):
        assert key in {row[0] for row in field_help()}, key


def test_overrides_are_typed_and_nested():
    cfg = load_config(embedded_config_path(), ["train.steps=7", "optim.lr=3e-4", "model.vision.layers=2",
                                                "data.train=/x/{0..3}.tar", "optim.betas=[0.8,0.9]",
                                                "logging.tensorboard=false"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.vision.layers == 2
    assert cfg.data.train == "/x/{0..3}.tar"
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.logging.tensorboard is False


def test_int_promotes_to_float_but_not_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "'train.stepz'"),
    ("trian.steps=3", "valid keys: data, model"),
    ("model.vision.widht=3", "valid keys: patch_size, width"),
])
def test_unknown_keys_name_key_and_choices(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  micro_bach: 4\n")
    with pytest.raises(ConfigError, match="train.micro_bach.*valid keys: steps, micro_batch"):
        load_config(p)


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="train.precision: 'fp8' is not one of bf16, fp16, fp32"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="logging.tensorboard: expected true or false"):
        load_config(None, ["logging.tensorboard=3"])
    with pytest.raises(ConfigError, match="'model.vision' is a section"):
        load_config(None, ["model.vision=3"])


def test_validation_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.vision.heads=5", "train.steps=0", "objectives.mim.mask_ratio=1.0"])
    msg = str(e.value)
    assert "model.vision.heads (5) must divide model.vision.width" in msg
    assert "train.steps must be >= 1" in msg
    assert "objectives.mim.mask_ratio" in msg


def test_world_size_must_divide_by_tp():
    cfg = load_config(None, ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp"):
        validate(cfg, world_size=3)


def test_round_trip_through_dict():
    cfg = load_config(embedded_config_path(), ["train.steps=11"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert Config() != cfg


def test_every_key_documented():
    rows = field_help()
    assert len(rows) > 40
    undocumented = [k for k, _, _, doc in rows if len(doc) < 10]
    assert not undocumented


def test_cli_reports_bad_key_with_exit_2():
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "config", "train.nope=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown config key 'train.nope'" in r.stderr


def test_readme_config_reference_is_current():
    """README's table is generated (`make docs`); a new or changed key must be documented there too."""
    from pathlib import Path

    from pretrain.config import markdown_reference

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_reference() in readme, "README config reference is stale: run `make docs`"
