"""Schedule checks (pretrain/config/schedule.py): combinations of keys, each valid alone, that make a feature
silently do nothing are refused naming every key; ones that run, but not as the keys suggest, are logged."""

from __future__ import annotations

import logging

import pytest

from pretrain.config import ConfigError, config_from_dict, embedded_config_path, load_config, to_dict
from pretrain.config import schedule as schedule_mod

VAL = "data.val=/nowhere/shard-000000.tar"


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(embedded_config_path(), list(overrides))
    return str(e.value)


@pytest.fixture
def logged(caplog, monkeypatch):
    """The schedule messages logged by the next loads (each is logged once per process: start afresh)."""
    monkeypatch.setattr(schedule_mod, "_warned", set())
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="mmpt.config")
    return lambda level: [r.getMessage() for r in caplog.records
                          if r.name == "mmpt.config" and r.levelno == level]


@pytest.mark.parametrize("overrides", [
    # the review's run E: the only checkpoint (step 5) is not a validation step (2, 4)
    ["train.steps=5", "eval.every=2", "checkpoint.every=0"],
    # validation never runs: eval.every > train.steps
    ["train.steps=10", "eval.every=20", "checkpoint.every=0"],
    # checkpoints at 4 and 5, validations at 3: checkpoint.every is refused as before, and nothing meets
    ["train.steps=5", "eval.every=3", "checkpoint.every=4"],
    # checkpoint.every a multiple of eval.every, but past the end: only step 7 is saved, not validated
    ["train.steps=7", "eval.every=2", "checkpoint.every=8"],
])
def test_keep_best_that_can_never_record_a_best_is_refused(overrides):
    msg = _problems(VAL, "checkpoint.keep_best=val/loss", *overrides)
    assert "checkpoint.keep_best=val/loss can never record a best" in msg
    for key in ("checkpoint.every", "eval.every", "eval.at_end", "train.steps"):
        assert key in msg, key


@pytest.mark.parametrize("overrides", [
    ["train.steps=5", "eval.every=2", "checkpoint.every=0", "eval.at_end=true"],  # step 5 validated, saved
    ["train.steps=6", "eval.every=2", "checkpoint.every=0"],  # the final checkpoint is a validation step
    ["train.steps=5", "eval.every=2", "checkpoint.every=4"],  # step 4: both
    ["train.steps=10", "eval.every=20", "checkpoint.every=0", "eval.at_end=true"],
])
def test_keep_best_with_a_validated_checkpoint_is_accepted(overrides):
    cfg = load_config(embedded_config_path(), [VAL, "checkpoint.keep_best=val/loss", *overrides])
    assert cfg.checkpoint.keep_best == "val/loss"


def test_stop_check_every_past_the_last_step_is_refused():
    msg = _problems("train.steps=10", "train.stop_check_every=11")
    assert "train.stop_check_every (11) must be <= train.steps (10)" in msg
    assert load_config(embedded_config_path(), ["train.steps=10", "train.stop_check_every=10"])
    assert load_config(embedded_config_path(), ["train.steps=10", "train.stop_check_every=0"])


def test_schedule_problems_are_listed_with_the_others():
    msg = _problems(VAL, "train.steps=5", "train.stop_check_every=6", "checkpoint.keep_best=val/loss",
                    "eval.every=2", "model.mlp_ratio=0")
    assert "train.stop_check_every" in msg and "can never record a best" in msg and "model.mlp_ratio" in msg


def test_a_stored_config_skips_the_schedule_checks():
    """A checkpoint saved before a check existed still loads (eval, export, resume's comparison)."""
    tree = to_dict(load_config(embedded_config_path(), ["train.steps=10"]))
    tree["train"]["stop_check_every"] = 50
    assert config_from_dict(tree).train.stop_check_every == 50


def test_warmup_longer_than_the_run_is_logged_naming_both_keys(logged):
    """Not refused: every shortened smoke run (`pretrain demo train.steps=3`: 30 warm-up steps) has it."""
    load_config(embedded_config_path(), ["train.steps=10", "optim.warmup_steps=50"])
    assert logged(logging.INFO) == [
        "config: optim.warmup_steps (50) > train.steps (10): the learning rate never reaches optim.lr (it "
        "peaks at 0.2 x optim.lr on the last step) and never decays; lower optim.warmup_steps for a full "
        "schedule"]
    load_config(embedded_config_path(), ["train.steps=10", "optim.warmup_steps=50"])
    load_config(embedded_config_path(), ["train.steps=10", "optim.warmup_steps=10"])
    assert len(logged(logging.INFO)) == 1  # once per process; warm-up == steps reaches optim.lr


def test_grad_accum_with_the_contrastive_loss_warns(logged):
    load_config(embedded_config_path(), ["train.grad_accum=2"])
    (msg,) = logged(logging.WARNING)
    assert "train.grad_accum=2" in msg and "objectives.contrastive.weight" in msg and "negatives" in msg
    load_config(embedded_config_path(), ["train.grad_accum=2", "objectives.contrastive.weight=0"])
    load_config(embedded_config_path(), ["train.grad_accum=1"])
    assert len(logged(logging.WARNING)) == 1


def test_schedule_messages_are_logged_on_rank_0_only(logged, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(embedded_config_path(), ["train.grad_accum=2"])
    assert logged(logging.WARNING) == []


def test_grad_accum_docs_say_accumulation_adds_no_negatives():
    from pretrain.config import field_help

    docs = {key: doc for key, _, _, doc in field_help()}
    assert "not negatives" in docs["train.grad_accum"]
    assert "changing the math" not in docs["train.global_batch"]
    assert "negatives" in docs["train.global_batch"]
