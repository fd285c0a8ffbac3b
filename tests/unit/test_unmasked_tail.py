"""FLIP's unmasked tail (`objectives.mim.unmasked_tail_steps`) and separate views
(`objectives.mim.shared_pass=false`): what the image encoder sees in each forward, at which training steps,
and across a resume inside the tail."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import logged_steps, run_pretrain, train_args, write_micro_shards
from tinymodel import make_batch, objectives, tiny_model_cfg

from pretrain.config import ConfigError
from pretrain.config.loading import load_config
from pretrain.metrics import read_metrics
from pretrain.models.pretrain_model import PretrainModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _seen_ratios(model: PretrainModel, batch: dict) -> tuple[list[float], dict]:
    """Mask ratios of every encoder pass in one forward, and its output."""
    ratios: list[float] = []
    original = model.visual.forward_features

    def spy(images, noise=None, mask_ratio=0.0):
        ratios.append(mask_ratio)
        return original(images, noise, mask_ratio)

    model.visual.forward_features = spy
    try:
        out = model(batch)
    finally:
        model.visual.forward_features = original
    return ratios, out


def _model(**mim) -> PretrainModel:
    o = objectives()
    for k, v in mim.items():
        setattr(o.mim, k, v)
    torch.manual_seed(0)
    return PretrainModel(tiny_model_cfg(), o, vocab_size=60).train()


def test_default_is_separate_views_and_shared_pass_is_one_masked_pass():
    ratios, out = _seen_ratios(_model(), make_batch())
    assert ratios == [0.0, 0.5] and "loss_mim" in out and "loss_contrastive" in out  # full view, MAE view
    ratios, out = _seen_ratios(_model(shared_pass=True), make_batch())
    assert ratios == [0.5] and "loss_mim" in out and "loss_contrastive" in out


def test_tail_trains_contrastive_on_full_images_and_skips_mae():
    model = _model(shared_pass=True)
    model.set_unmasked_tail(True)
    assert model.contrastive_mask_ratio() == 0.0
    ratios, out = _seen_ratios(model, make_batch())
    assert ratios == [0.0]
    assert "loss_mim" not in out and "loss_mlm" in out
    assert torch.allclose(out["loss"], out["loss_contrastive"] + out["loss_mlm"])
    model.set_unmasked_tail(False)
    assert _seen_ratios(model, make_batch())[0] == [0.5]


def test_separate_views_give_contrastive_full_images_and_mae_its_own_masked_pass():
    model = _model(shared_pass=False, mask_ratio=0.75)
    ratios, out = _seen_ratios(model, make_batch())
    assert ratios == [0.0, 0.75] and "loss_mim" in out
    full = _model(weight=0.0, mask_ratio=0.0)  # contrastive+MLM only, full images: same contrastive loss
    full.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(full(make_batch())["loss_contrastive"], out["loss_contrastive"], atol=1e-6)


def test_eval_mode_is_unchanged():
    model = _model().eval()
    ratios, out = _seen_ratios(model, make_batch())
    assert ratios == [0.0, 0.5] and "loss_mim" in out


def test_config_checks():
    with pytest.raises(ConfigError, match="unmasked_tail_steps"):
        load_config(None, ["train.steps=10", "objectives.mim.unmasked_tail_steps=11"])
    with pytest.raises(ConfigError, match="unmasked_tail_steps"):
        load_config(None, ["objectives.mim.unmasked_tail_steps=-1"])
    assert load_config(None, ["train.steps=10", "objectives.mim.unmasked_tail_steps=10"])


def test_training_switches_at_the_right_step_and_a_resume_inside_the_tail_stays_unmasked(tmp_path):
    """ZeRO-3, 5 steps, last 2 unmasked; killed after step 4 (inside the tail) before its checkpoint,
    resumed from step 3's: steps 4 and 5 run unmasked again, and the decoder going unused in the tail
    does not break ZeRO-3."""
    shards = write_micro_shards(tmp_path / "shards")
    args = train_args(shards, tmp_path / "run", 5, "data.workers=0", "objectives.mim.unmasked_tail_steps=2",
                      "checkpoint.every=1", "objectives.mim.shared_pass=true")
    r = run_pretrain(["train", *args], env={"MMPT_FAULT_KILL": "after-step:4"})
    assert r.returncode != 0
    r = run_pretrain(["train", *args, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["start_step"] == 3
    rows = {row["step"]: row for row in read_metrics(tmp_path / "run")}
    assert sorted(rows) == [1, 2, 3, 4, 5] and logged_steps(tmp_path / "run")[-1] == 5
    assert [rows[s]["contrastive_mask_ratio"] for s in range(1, 6)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert ["loss_mim" in rows[s] for s in range(1, 6)] == [True, True, True, False, False]


def test_separate_views_train_under_zero3(tmp_path):
    shards = write_micro_shards(tmp_path / "shards")
    r = run_pretrain(["train", *train_args(shards, tmp_path / "run", 2, "data.workers=0",
                                           "objectives.mim.shared_pass=false")])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [row["contrastive_mask_ratio"] for row in rows] == [0.0, 0.0] and "loss_mim" in rows[-1]
