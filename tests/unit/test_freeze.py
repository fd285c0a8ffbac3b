"""`train.freeze` and `optim.lr_mult`: config parsing, pattern matching and its errors, parameter groups,
the LR schedule per group, and the memory plan's optimizer bytes. Fast, single process, meta-device models
where weights do not matter."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY

from parallel.engine import lr_lambda, param_groups
from parallel.param_groups import first_pattern, match_patterns
from pretrain.config import ConfigError, engine_spec, field_help, load_config
from pretrain.freeze import apply_freeze, frozen_names
from pretrain.models.pretrain_model import PretrainModel
from pretrain.plan.memory import memory_plan


def model_for(*overrides: str) -> tuple[PretrainModel, object]:
    cfg = load_config(None, [*TINY, *overrides])
    with torch.device("meta"):
        return PretrainModel.from_config(cfg), cfg


# ------------------------------------------------------------------------------------------- config
def test_config_from_overrides_and_yaml(tmp_path):
    cfg = load_config(None, ["train.freeze=[visual.*, logit_scale]",
                             "optim.lr_mult={text.*: 0.1, mlm_head.*: 2}"])
    assert cfg.train.freeze == ["visual.*", "logit_scale"]
    assert cfg.optim.lr_mult == {"text.*": 0.1, "mlm_head.*": 2.0}
    assert isinstance(cfg.optim.lr_mult["mlm_head.*"], float)
    f = tmp_path / "lit.yaml"
    f.write_text("train:\n  freeze: ['visual.*']\noptim:\n  lr_mult:\n    'text.*': 0.5\n")
    cfg = load_config(f, ["optim.lr_mult={}"])  # an override replaces the whole mapping
    assert cfg.train.freeze == ["visual.*"] and cfg.optim.lr_mult == {}
    assert load_config(f).optim.lr_mult == {"text.*": 0.5}
    types = {key: tname for key, tname, _, _ in field_help()}
    assert types["optim.lr_mult"] == "dict[str, float]" and types["train.freeze"] == "list[str]"


@pytest.mark.parametrize("override, words", [
    ("optim.lr_mult=0.1", ["optim.lr_mult", "mapping"]),
    ("optim.lr_mult={text.*: fast}", ["optim.lr_mult", "text.*", "number"]),
    ("optim.lr_mult={text.*: -1}", ["optim.lr_mult", ">= 0"]),
    ("train.freeze=visual.*", ["train.freeze", "list"]),
    ("train.freeze=[visual.*, visual.*]", ["train.freeze", "twice"]),
])
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------- patterns
def test_first_pattern_wins_and_unused_patterns_are_reported():
    names = ["text.a.weight", "text.token_embedding.weight", "visual.proj"]
    taken, unused = first_pattern(names, ["text.token_embedding.*", "text.*", "nothing.*"])
    assert taken == {"text.token_embedding.weight": "text.token_embedding.*", "text.a.weight": "text.*"}
    assert unused == ["nothing.*"]
    _, unused = first_pattern(names, ["text.*", "text.token_embedding.*"])  # shadowed by the earlier one
    assert unused == ["text.token_embedding.*"]
    assert match_patterns(names, ["*.weight", "visual.proj"]) == {
        "*.weight": ["text.a.weight", "text.token_embedding.weight"], "visual.proj": ["visual.proj"]}


def test_freeze_selects_the_image_tower():
    model, cfg = model_for("train.freeze=[visual.*]")
    frozen = apply_freeze(model, cfg)
    visual = [n for n, _ in model.named_parameters() if n.startswith("visual.")]
    assert frozen == visual and len(visual) > 10
    assert all(p.requires_grad != n.startswith("visual.") for n, p in model.named_parameters())


@pytest.mark.parametrize("override, words", [
    ("train.freeze=[visul.*]",
     ["train.freeze", "'visul.*'", "matches no parameter", "visual.class_embedding"]),
    ("train.freeze=['*']", ["train.freeze", "every parameter"]),
    ("optim.lr_mult={txt.*: 0.1}", ["optim.lr_mult", "'txt.*'", "matches no parameter", "text."]),
    ("optim.lr_mult={text.*: 0.1, text.transformer.*: 0.5}", ["'text.transformer.*'", "earlier", "'text.*'"]),
])
def test_patterns_that_select_nothing_are_config_errors(override, words):
    model, cfg = model_for(override)
    with pytest.raises(ConfigError) as e:
        apply_freeze(model, cfg)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_lr_mult_on_frozen_parameters_only_is_an_error():
    model, cfg = model_for("train.freeze=[visual.*]", "optim.lr_mult={visual.transformer.*: 0.1}")
    with pytest.raises(ConfigError, match="only parameters that train.freeze freezes"):
        apply_freeze(model, cfg)
    assert frozen_names(model, cfg)[0].startswith("visual.")  # the freeze patterns alone are fine


# ------------------------------------------------------------------------------------ param groups
def test_groups_without_multipliers_are_unchanged():
    model, _ = model_for()
    groups = param_groups(model, 0.1)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_groups_carry_multiplied_rates_and_leave_frozen_out():
    model, cfg = model_for("train.freeze=[visual.*]",
                           "optim.lr_mult={text.transformer.*: 0.5, logit_scale: 0}")
    apply_freeze(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, 2e-3, cfg.optim.lr_mult)
    assert groups[0]["lr_mult"] == 1.0  # get_lr()[0], which metrics log, is the base rate
    by_mult: dict[float, list[str]] = {}
    for g in groups:
        assert g["lr"] == 2e-3 * g["lr_mult"] and g["params"]
        by_mult.setdefault(g["lr_mult"], []).extend(names[id(p)] for p in g["params"])
    assert by_mult[0.0] == ["logit_scale"]
    assert by_mult[0.5] and all(n.startswith("text.transformer.") for n in by_mult[0.5])
    grouped = [n for ns in by_mult.values() for n in ns]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {n for n, p in model.named_parameters() if not n.startswith("visual.")}


def test_schedule_keeps_every_group_at_its_multiple():
    """torch's LambdaLR (what build_engine hands DeepSpeed) multiplies each group's own initial rate."""
    cfg = load_config(None, [*TINY, "optim.lr_mult={text.*: 0.5, logit_scale: 0}", "train.steps=10"])
    model = PretrainModel.from_config(cfg)
    spec = engine_spec(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.1, spec.optim.lr, spec.optim.lr_mult), lr=spec.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))
    base = lr_lambda(spec)
    for step in range(10):
        for g in opt.param_groups:
            assert g["lr"] == spec.optim.lr * g["lr_mult"] * base(step)
        half = [g["lr"] for g in opt.param_groups if g["lr_mult"] == 0.5]
        one = [g["lr"] for g in opt.param_groups if g["lr_mult"] == 1.0]
        assert half[0] == 0.5 * one[0]  # exact: halving is exact in binary floating point
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("stage", [1, 3])
def test_plan_gives_frozen_parameters_no_optimizer_state(stage):
    common = [*TINY, f"parallel.zero_stage={stage}", "train.precision=bf16"]
    full = memory_plan(load_config(None, common), world=2)
    lit = memory_plan(load_config(None, [*common, "train.freeze=[visual.*]"]), world=2)
    model, _ = model_for()
    visual = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert lit["params"]["frozen"] == visual > 0
    assert full["params"]["frozen"] == 0
    trainable = full["params"]["total"] - visual
    assert lit["per_rank_bytes"]["optimizer"] == round(12 * trainable / 2)
    assert full["per_rank_bytes"]["optimizer"] == round(12 * full["params"]["total"] / 2)
    assert lit["per_rank_bytes"]["params"] == full["per_rank_bytes"]["params"]  # still held
    assert lit["per_rank_bytes"]["grads"] < full["per_rank_bytes"]["grads"]
