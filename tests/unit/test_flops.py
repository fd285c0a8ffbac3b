"""The analytic FLOP count: a hand count of a tiny config, and torch's FlopCounterMode on the real model
(which counts every matmul, convolution and linear it runs except CPU attention, which SDPA does
outside the counted ops), so a forgotten or double-counted layer fails here."""

from __future__ import annotations

import pytest
import torch
from tinymodel import B, V, make_batch, objectives, tiny_model_cfg
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import Config
from pretrain.models import PretrainModel
from pretrain.plan.flops import block_flops, flops_per_sample


def _cfg(**weights: float) -> Config:
    cfg = Config()
    cfg.model, cfg.objectives, cfg.train.micro_batch = tiny_model_cfg(), objectives(**weights), B
    cfg.objectives.mim.shared_pass = True  # the FLIP path here; separate views: their own test below
    return cfg


def test_block_flops_by_hand():
    # W=4, H=16, T=3: qkv 2*3*4*12=288, out 2*3*4*4=96, mlp 2*(2*3*4*16)=768; attention 4*9*4=144
    assert block_flops(4, 3, 4.0) == 288 + 96 + 768 + 144
    assert block_flops(4, 3, 4.0, causal=True) == 288 + 96 + 768 + 4 * 6 * 4  # 6 = 3*4/2 pairs


def test_tiny_config_by_hand():
    """S=16, p=4 -> 16 patches, 8 visible (mask 0.5); widths 32/32/16, E=24, L=8, padded V=64."""
    cfg = _cfg()
    f = flops_per_sample(cfg, vocab_size=64)
    vis_block = 2 * 9 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * 81 * 32  # 1 CLS + 8 visible tokens
    assert f["parts"]["vision_encoder"] == 2 * 16 * 48 * 32 + 2 * vis_block
    assert f["parts"]["vision_proj"] == f["parts"]["text_proj"] == 2 * 32 * 24
    txt_proj = 2 * 8 * (4 * 32 * 32 + 2 * 32 * 128)
    assert f["parts"]["text_causal"] == 2 * (txt_proj + 4 * 36 * 32)
    assert f["parts"]["text_mlm"] == 2 * (txt_proj + 4 * 64 * 32)
    assert f["parts"]["contrastive_logits"] == 2 * 2 * B * 24  # both directions, B columns each
    dec_block = 2 * 17 * (4 * 16 * 16 + 2 * 16 * 64) + 4 * 289 * 16
    assert f["parts"]["decoder"] == 2 * 9 * 32 * 16 + dec_block + 2 * 17 * 16 * 48
    assert f["parts"]["mlm_head"] == 2 * 8 * (32 * 32 + 32 * 64)
    assert f["forward"] == sum(f["parts"].values()) and f["train"] == 3 * f["forward"]


def _attention_flops(cfg: Config, f: dict) -> int:
    """The QK^T + AV FLOPs inside our count (FlopCounterMode does not see CPU SDPA)."""
    m = cfg.model
    out = 0
    if "vision_encoder" in f["parts"]:
        out += m.vision.layers * 4 * (1 + f["visible_patches"]) ** 2 * m.vision.width
    if "vision_encoder_full" in f["parts"]:  # separate views: the contrastive pass over every patch
        out += m.vision.layers * 4 * (1 + f["patches"]) ** 2 * m.vision.width
    if "text_causal" in f["parts"]:
        L = m.text.context_length
        out += m.text.layers * 4 * (L * (L + 1) // 2) * m.text.width
    if "text_mlm" in f["parts"]:
        out += m.text.layers * 4 * m.text.context_length ** 2 * m.text.width
    if "decoder" in f["parts"]:
        out += m.decoder.layers * 4 * (1 + f["patches"]) ** 2 * m.decoder.width
    return out


@pytest.mark.parametrize("weights", [{}, {"mim": 0.0}, {"mlm": 0.0}, {"contrastive": 0.0}])
def test_matches_torch_flop_counter_on_the_model(weights):
    torch.manual_seed(0)
    cfg = _cfg(**weights)
    model = PretrainModel(cfg.model, cfg.objectives, vocab_size=V).train()
    with FlopCounterMode(display=False) as counter:
        model(make_batch())
    f = flops_per_sample(cfg, vocab_size=model.vocab_size)
    assert counter.get_total_flops() == B * (f["forward"] - _attention_flops(cfg, f))


@pytest.mark.parametrize("target", ["pixels", "features"])
def test_separate_views_match_torch_flop_counter(target):
    """The default recipe: a full-image contrastive pass plus MAE's masked pass (and a feature head)."""
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.objectives.mim.shared_pass, cfg.objectives.mim.target = False, target
    model = PretrainModel(cfg.model, cfg.objectives, vocab_size=V).train()
    with FlopCounterMode(display=False) as counter:
        model(make_batch())
    f = flops_per_sample(cfg, vocab_size=model.vocab_size)
    assert "vision_encoder_full" in f["parts"]
    assert counter.get_total_flops() == B * (f["forward"] - _attention_flops(cfg, f))


def test_siglip_scores_one_direction_and_columns_follow_global_batch():
    cfg = _cfg()
    infonce = flops_per_sample(cfg, 64, global_batch=1024)["parts"]["contrastive_logits"]
    cfg.objectives.contrastive.loss = "siglip"
    assert flops_per_sample(cfg, 64, global_batch=1024)["parts"]["contrastive_logits"] == infonce // 2
    assert infonce == 2 * 2 * 1024 * 24
