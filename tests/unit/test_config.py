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


@pytest.mark.parametrize("override, value", [
    ("run.dir=/mnt/exp #3/run", "/mnt/exp #3/run"),  # YAML would read ` #3/run` as a comment
    ("run.dir=%x-%j", "%x-%j"),  # a YAML directive
    ("data.train=@bucket/shards", "@bucket/shards"),  # a reserved character
    ("cross_site.site=no", "no"),  # YAML 1.1's false
    ("cross_site.site=0", "0"),
    ("cross_site.rendezvous=[::1]:29400", "[::1]:29400"),  # a flow sequence
    ("run.dir='a #b'", "a #b"),  # quoted: YAML reads the quotes away
    ('cross_site.site="x\\ty"', "x\ty"),
])
def test_string_keys_take_the_override_text_as_typed(override, value):
    from pretrain.config import get_key

    # a site's keys count only with cross_site.sites >= 2 (alone they are refused: the job would not meet
    # the other sites); the override comes last, so it wins over the valid values before it
    on = (["cross_site.sites=2", "cross_site.site=a", "cross_site.rendezvous=127.0.0.1:29400"]
          if override.startswith("cross_site.") else [])
    assert get_key(load_config(None, [*on, override]), override.split("=", 1)[0]) == value


def test_other_keys_are_still_yaml_typed():
    cfg = load_config(None, ["logging.tensorboard=no", "train.steps=12", "optim.betas=[0.8, 0.9]",
                             "train.freeze=[text.*]"])
    assert cfg.logging.tensorboard is False and cfg.train.steps == 12
    assert cfg.optim.betas == [0.8, 0.9] and cfg.train.freeze == ["text.*"]


def test_yaml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: not valid YAML") and f'in "{p}", line 2' in str(e.value)
    p.write_bytes(b"\xff\xfe train: 1\n")
    with pytest.raises(ConfigError, match="not UTF-8 text") as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ")


def test_yaml_syntax_error_is_one_line_through_the_cli(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {steps: 3\n")
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "config", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"pretrain: config error: {p}: not valid YAML" in r.stderr


def test_duplicate_keys_in_a_recipe_are_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  steps: 1\nmodel:\n  embed_dim: 32\ntrain:\n  micro_batch: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}, line 5: key 'train' is given twice")
    assert "first on line 1" in str(e.value)
    p.write_text("train:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(ConfigError, match="key 'steps' is given twice"):
        load_config(p)


def test_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("x-tower: &tower {width: 64, heads: 2, layers: 1}\n"
                 "model:\n  vision: {<<: *tower, layers: 3}\n  text: *tower\n")
    with pytest.raises(ConfigError, match="unknown config key 'x-tower'"):  # merged fine, then the schema
        load_config(p)
    p.write_text("model:\n  vision: &tower {width: 64, heads: 2, layers: 1}\n"
                 "  text: {<<: *tower, layers: 3}\n")
    cfg = load_config(p)
    assert (cfg.model.text.width, cfg.model.text.layers, cfg.model.vision.layers) == (64, 3, 1)


@pytest.mark.parametrize("override, needle", [
    ("model.mlp_ratio=-1", "model.mlp_ratio must be > 0"),
    ("model.mlp_ratio=.nan", "model.mlp_ratio must be a finite number"),
    ("objectives.contrastive.max_logit_scale=-5", "objectives.contrastive.max_logit_scale must be > 0"),
    ("optim.eps=-1", "optim.eps must be > 0"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean must be a finite number"),
])
def test_float_keys_out_of_range_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_nan_mlp_ratio_with_tensor_parallelism_is_a_config_error():
    with pytest.raises(ConfigError, match="model.mlp_ratio must be a finite number"):
        load_config(None, ["model.mlp_ratio=.nan", "parallel.tp=2"], world_size=2)
