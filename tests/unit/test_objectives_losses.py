"""Losses against references written out directly, and the joint model's forward: finite losses, every
enabled loss falls on a fixed batch, weight 0 removes an objective, ZeRO-3-safe module calls."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tinymodel import B, N, P, S, V, make_batch, objectives, tiny_model_cfg

from pretrain.models import PretrainModel
from pretrain.objectives import contrastive_loss, feature_mim_loss, mim_loss, mlm_loss, patchify, unpatchify

pytestmark = pytest.mark.usefixtures("one_thread")



# ------------------------------------------------------------------------------------- contrastive
def reference_clip_loss(img, txt, scale):
    """Written out: -log softmax of the matching pair, per row of each similarity matrix."""
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    sim = scale * img @ txt.T  # [B, B], rows: images
    i2t = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    t2i = -(sim.diag() - sim.logsumexp(dim=0)).mean()  # columns are the text rows of sim.T
    return (i2t + t2i) / 2


def test_contrastive_matches_reference_both_directions():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(B, 24, generator=gen), torch.randn(B, 24, generator=gen)
    scale = torch.tensor(12.5)
    loss = contrastive_loss(img, txt, scale)
    torch.testing.assert_close(loss, reference_clip_loss(img, txt, scale))
    one_way = F.cross_entropy(scale * F.normalize(img) @ F.normalize(txt).T, torch.arange(B))
    assert not torch.allclose(loss, one_way)  # the text->image direction contributes
    # gradients too, including the scale's
    feats = [img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()]
    ref = [t.clone().requires_grad_() for t in (img, txt, scale)]
    contrastive_loss(*feats).backward()
    reference_clip_loss(*ref).backward()
    for a, r in zip(feats, ref):
        torch.testing.assert_close(a.grad, r.grad)


def test_contrastive_computes_in_fp32_from_bf16():
    gen = torch.Generator().manual_seed(1)
    img, txt = torch.randn(B, 24, generator=gen), torch.randn(B, 24, generator=gen)
    loss = contrastive_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(50.0, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    ref = reference_clip_loss(img.bfloat16().float(), txt.bfloat16().float(), torch.tensor(50.0))
    torch.testing.assert_close(loss, ref)


# --------------------------------------------------------------------------------------------- mlm
def test_mlm_loss_ignores_minus_100():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 7, 0
    sel = labels != -100
    ref = -logits[sel].log_softmax(-1).gather(1, labels[sel][:, None]).mean()
    torch.testing.assert_close(mlm_loss(logits, labels), ref)
    noisy = logits.clone()
    noisy[~sel] += 100 * torch.randn_like(noisy[~sel])
    torch.testing.assert_close(mlm_loss(noisy, labels), ref)
    assert mlm_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_mlm_loss_without_targets_is_zero_with_grad():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 5), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------- mim
def test_patchify_order_and_round_trip():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, S, S, generator=gen)
    patches = patchify(images, P)
    assert patches.shape == (2, N, P * P * 3)
    g = S // P
    for i in (0, 1, g, N - 1):
        r, c = divmod(i, g)
        block = images[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P]  # [2, 3, p, p]
        assert torch.equal(patches[:, i], block.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(patches, P), images)


def test_mim_loss_only_on_masked_patches():
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, S, S, generator=gen)
    pred = torch.randn(2, N, P * P * 3, generator=gen)
    mask = (torch.rand(2, N, generator=gen) < 0.5).float()
    target = patchify(images, P)
    ref = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(mim_loss(pred, images, mask, P, norm_pix_loss=False), ref)
    edited = pred.clone()
    edited[mask == 0] += 10.0  # visible patches do not count
    torch.testing.assert_close(mim_loss(edited, images, mask, P, norm_pix_loss=False), ref)
    edited = pred.clone()
    edited[mask == 1] += 10.0
    assert mim_loss(edited, images, mask, P, norm_pix_loss=False) > ref + 50


def test_mim_norm_pix_targets_are_per_patch_normalised():
    gen = torch.Generator().manual_seed(5)
    images = 3.0 + 2.0 * torch.randn(2, 3, S, S, generator=gen)
    mask = torch.ones(2, N)
    t = patchify(images, P)
    normed = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mim_loss(normed, images, mask, P, norm_pix_loss=True).item() < 1e-10
    assert mim_loss(normed, images, mask, P, norm_pix_loss=False).item() > 1.0
    # a prediction right up to each patch's offset and scale is only right without norm_pix
    assert mim_loss(t, images, mask, P, norm_pix_loss=False).item() == 0.0
    assert mim_loss(t, images, mask, P, norm_pix_loss=True).item() > 1.0


def test_mim_norm_pix_eps_keeps_flat_patches_from_becoming_noise():
    gen = torch.Generator().manual_seed(6)
    images = 0.5 + 3e-3 * torch.randn(2, 3, S, S, generator=gen)  # flat patches + JPEG-sized noise
    mask = torch.ones(2, N)
    flat = torch.zeros(2, N, P * P * 3)  # predicting "flat" is all anyone can do
    assert mim_loss(flat, images, mask, P, norm_pix_eps=1e-6).item() > 0.85  # MAE's eps: unit-variance noise
    assert mim_loss(flat, images, mask, P, norm_pix_eps=1e-2).item() < 1e-3
    textured = 3.0 + 2.0 * torch.randn(2, 3, S, S, generator=gen)  # var ~4: the floor changes ~nothing
    t = patchify(textured, P)
    normed = (t - t.mean(-1, keepdim=True)) / t.var(-1, keepdim=True).sqrt()
    assert mim_loss(normed, textured, mask, P, norm_pix_eps=1e-2).item() < 1e-5


# ---------------------------------------------------------------------------------- joint model
def test_forward_gives_finite_losses_and_expected_keys():
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train()
    out = model(make_batch())
    assert set(out) == {"loss", "loss_contrastive", "loss_mim", "loss_mlm", "logit_scale"}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values())
    expect = out["loss_contrastive"] + out["loss_mim"] + out["loss_mlm"]
    torch.testing.assert_close(out["loss"].detach(), expect)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["loss_mlm"].item() == pytest.approx(math.log(64), rel=0.1)  # near-uniform at init


def test_weights_scale_the_total_and_logit_scale_starts_at_most_at_its_ceiling():
    torch.manual_seed(0)
    o = objectives(contrastive=0.5, mim=2.0, mlm=0.25)
    o.contrastive.max_logit_scale = 10.0  # below the initial 1/0.07
    model = PretrainModel(tiny_model_cfg(), o, vocab_size=V).train()
    out = model(make_batch())
    expect = 0.5 * out["loss_contrastive"] + 2.0 * out["loss_mim"] + 0.25 * out["loss_mlm"]
    torch.testing.assert_close(out["loss"].detach(), expect)
    assert out["logit_scale"].item() == pytest.approx(10.0)
    out["loss"].backward()
    # no clamp in forward: at the ceiling the gradient still flows, so the scale can come back down
    # (the training loop clamps the parameter after each step: tests/e2e/test_logit_scale.py)
    assert model.logit_scale.grad.item() != 0.0


def test_bf16_forward_computes_losses_in_fp32():
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train().bfloat16()
    batch = {k: v.bfloat16() if v.is_floating_point() else v for k, v in make_batch().items()}
    out = model(batch)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values())
    out["loss"].backward()
    assert model.visual.conv1.weight.grad.dtype == torch.bfloat16


def test_eval_contrastive_sees_every_patch():
    torch.manual_seed(0)
    o = objectives()
    o.mim.shared_pass = True  # training masks the contrastive pass too (FLIP); eval must not
    model = PretrainModel(tiny_model_cfg(), o, vocab_size=V).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        scale = model.logit_scale.exp()
        ref = contrastive_loss(model.visual(batch["image"]), model.text(batch["text"]), scale)
        masked = model.train()(batch)
    torch.testing.assert_close(out["loss_contrastive"], ref)
    assert not torch.allclose(masked["loss_contrastive"], ref)
    torch.testing.assert_close(out["loss_mim"], masked["loss_mim"])  # same noise, same masked pass


def test_thirty_adamw_steps_drive_every_loss_down():
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch = make_batch()
    history = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    for k in ("loss", "loss_contrastive", "loss_mim", "loss_mlm"):
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])


@pytest.mark.parametrize("off", ["contrastive", "mim", "mlm"])
def test_weight_zero_removes_objective(off):
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(**{off: 0.0}), vocab_size=V).train()
    names = [n for n, _ in model.named_parameters()]
    assert (model.decoder is None) == (off == "mim")
    assert (model.mlm_head is None) == (off == "mlm")
    if off == "mim":
        assert not any(n.startswith("decoder.") for n in names)
    if off == "mlm":
        assert not any(n.startswith("mlm_head.") for n in names)
    text_calls = []
    model.text.register_forward_pre_hook(lambda mod, args, kwargs: text_calls.append(kwargs.get("causal")),
                                         with_kwargs=True)
    out = model(make_batch())
    assert f"loss_{off}" not in out
    assert {k for k in out if k.startswith("loss_")} == {f"loss_{k}" for k in ("contrastive", "mim", "mlm")
                                                          if k != off}
    expect_calls = {"contrastive": [False], "mim": [True, False], "mlm": [True]}[off]
    assert text_calls == expect_calls
    out["loss"].backward()


def test_every_parameter_is_used_inside_its_own_module_call():
    """ZeRO-3 gathers a module's own parameters only in its forward hooks: any parameter that gets a
    gradient must belong to a module whose forward ran (e.g. no tower body called directly)."""
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train()
    entered: set[int] = set()
    owners = {}
    for mod in model.modules():
        own = list(mod.parameters(recurse=False))
        if own:
            mod.register_forward_pre_hook(lambda m, args: entered.add(id(m)))
            owners.update({id(p): mod for p in own})
    model(make_batch())["loss"].backward()
    used = [p for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(used) == len(list(model.parameters()))  # every parameter trains
    for p in used:
        assert id(owners[id(p)]) in entered, type(owners[id(p)]).__name__


def test_no_zero_dim_parameters():
    """DeepSpeed broadcasts parameters at start-up as `p.data.view(torch.uint8)`, which 0-dim tensors
    (CLIP's scalar logit_scale) refuse."""
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V)
    for name, p in model.named_parameters():
        assert p.ndim >= 1, name
        p.data.view(torch.uint8)
    out = model(make_batch())
    assert out["logit_scale"].shape == () and out["loss"].shape == ()


def test_ignores_extra_batch_keys_and_requires_noise_when_masking():
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train()
    batch = make_batch()
    base = model(batch)["loss"]
    torch.testing.assert_close(model({**batch, "_skips": {}, "cls": batch["cls"] + 1})["loss"], base)
    with pytest.raises(ValueError, match="patch_noise"):
        model({k: v for k, v in batch.items() if k != "patch_noise"})
    cfg = dataclasses.replace(tiny_model_cfg(), vocab_pad_multiple=7)
    assert PretrainModel(cfg, objectives(), vocab_size=V).vocab_size == 63


# ---------------------------------------------------------------------- MIM with feature targets
def test_feature_mim_loss_is_masked_mse_to_a_stop_gradient_layer_normed_target():
    gen = torch.Generator().manual_seed(7)
    target = (5.0 + 3.0 * torch.randn(B, N, 16, generator=gen)).requires_grad_()
    mask = (torch.rand(B, N, generator=gen) > 0.5).float()
    exact = F.layer_norm(target.detach(), (16,))
    assert feature_mim_loss(exact, target, mask).item() < 1e-10
    pred = exact.clone()
    pred[mask == 0] += 100.0  # visible patches are not scored
    assert feature_mim_loss(pred, target, mask).item() < 1e-10
    pred = torch.zeros(B, N, 16, requires_grad=True)
    loss = feature_mim_loss(pred, target, mask)
    assert loss.item() == pytest.approx(1.0, rel=0.05)  # a layer-normed target has unit variance
    loss.backward()
    assert target.grad is None and pred.grad.abs().sum() > 0


def test_feature_target_predicts_the_full_views_tokens():
    torch.manual_seed(0)
    o = objectives()
    o.mim.target, o.mim.shared_pass = "features", False
    model = PretrainModel(tiny_model_cfg(), o, vocab_size=V).train()
    assert model.decoder.decoder_pred.out_features == model.visual.width
    batch = make_batch()
    out = model(batch)
    assert torch.isfinite(out["loss_mim"])
    _, full, _, _ = model.visual.forward_features(batch["image"])
    _, vis, mask, ids = model.visual.forward_features(batch["image"], batch["patch_noise"], o.mim.mask_ratio)
    expect = feature_mim_loss(model.decoder(vis, ids), full[:, 1:], mask)
    torch.testing.assert_close(out["loss_mim"], expect.detach())
    out["loss"].backward()
    assert model.decoder.decoder_pred.weight.grad.abs().sum() > 0
    assert model.visual.conv1.weight.grad.abs().sum() > 0


def test_feature_target_needs_separate_views():
    from pretrain.config import ConfigError, embedded_config_path, load_config

    with pytest.raises(ConfigError, match="target=features needs objectives.mim.shared_pass=false"):
        load_config(embedded_config_path(), ["objectives.mim.target=features",
                                              "objectives.mim.shared_pass=true"])
    with pytest.raises(ConfigError, match="objectives.mim.target must be pixels or features"):
        load_config(embedded_config_path(), ["objectives.mim.target=tokens"])
