"""Tiled (chunked) InfoNCE and SigLIP: same loss and gradients as the plain losses, which hold the whole
logit matrix; over 2 gloo ranks the tiled local loss reproduces the single-process full batch; the joint
model trains with every option.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_objectives_chunked.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tinymodel import V, make_batch, objectives, tiny_model_cfg

from pretrain.config import ConfigError, load_config
from pretrain.models import PretrainModel
from pretrain.objectives import contrastive_loss
from pretrain.objectives.tiled import tiled_row_ce


def _inputs(b: int, e: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, e, generator=gen, dtype=dtype), torch.randn(b, e, generator=gen, dtype=dtype),
            torch.tensor(14.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)]


def _loss_and_grads(inputs: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    img, txt, scale, bias = (t.clone().requires_grad_() for t in inputs)
    loss = contrastive_loss(img, txt, scale, logit_bias=bias if kw.get("loss") == "siglip" else None, **kw)
    loss.backward()
    grads = [loss.detach(), img.grad, txt.grad, scale.grad]
    return grads + ([bias.grad] if kw.get("loss") == "siglip" else [])


def reference_siglip(img, txt, scale, bias):
    """Written out from the SigLIP paper: -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
    x, y = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    return -torch.log(torch.sigmoid(z * (scale * x @ y.T + bias))).sum() / x.shape[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
@pytest.mark.parametrize("b,chunk", [(8, 3), (8, 8), (13, 4), (13, 32), (32, 5)])
def test_tiled_equals_plain_loss_and_gradients(dtype, loss, b, chunk):
    inputs = _inputs(b, 16, dtype, seed=b + chunk)
    plain = _loss_and_grads(inputs, loss=loss, chunk=0)
    tiled = _loss_and_grads(inputs, loss=loss, chunk=chunk)
    for p, t in zip(plain, tiled, strict=True):
        torch.testing.assert_close(t, p, rtol=1e-5, atol=1e-5)
    assert plain[3].abs() > 1e-3  # the scale's gradient is not trivially zero


def test_plain_siglip_matches_written_out_reference():
    inputs = _inputs(10, 8, torch.float64)
    ours = _loss_and_grads(inputs, loss="siglip", chunk=3)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = reference_siglip(*leaves)
    ref.backward()
    torch.testing.assert_close(ours[0], ref.detach())
    for got, leaf in zip(ours[1:], leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad)


def test_tiled_row_ce_is_one_cross_entropy_direction_with_offset():
    """Rows 4..7 of an 8-column problem (what rank 1 of 2 computes): positives sit at offset + i."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(8, 6, generator=gen,
                                                                              dtype=torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64)
    ref = F.cross_entropy(scale * q @ k.T, torch.arange(4) + 4)
    torch.testing.assert_close(tiled_row_ce(q, k, scale, 4, 3), ref)


def test_siglip_needs_bias_and_unknown_loss_is_rejected():
    img, txt, scale, _ = _inputs(4, 8, torch.float32)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(img, txt, scale, loss="siglip")
    with pytest.raises(ValueError, match="not one of"):
        contrastive_loss(img, txt, scale, loss="hinge")


def test_config_keys_are_checked():
    cfg = load_config(None, ["objectives.contrastive.loss=siglip", "objectives.contrastive.chunk=256"])
    assert (cfg.objectives.contrastive.loss, cfg.objectives.contrastive.chunk) == ("siglip", 256)
    with pytest.raises(ConfigError, match="objectives.contrastive.loss"):
        load_config(None, ["objectives.contrastive.loss=softmax"])
    with pytest.raises(ConfigError, match="objectives.contrastive.chunk"):
        load_config(None, ["objectives.contrastive.chunk=-1"])


# ---------------------------------------------------------------------------------- joint model
@pytest.mark.parametrize("loss,chunk", [("infonce", 3), ("siglip", 0), ("siglip", 3)])
def test_model_trains_with_each_option(loss, chunk):
    torch.manual_seed(0)
    o = objectives(mim=0.0, mlm=0.0)
    o.contrastive.loss, o.contrastive.chunk = loss, chunk
    model = PretrainModel(tiny_model_cfg(), o, vocab_size=V).train()
    assert (model.logit_bias is not None) == (loss == "siglip")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch = make_batch()
    history = []
    for _ in range(15):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(out["loss_contrastive"].item())
    assert history[-1] < 0.8 * history[0], history
    if loss == "siglip":
        assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


def test_model_tiled_and_plain_agree():
    torch.manual_seed(0)
    plain = PretrainModel(tiny_model_cfg(), objectives(), vocab_size=V).train()
    o = objectives()
    o.contrastive.chunk = 3
    tiled = PretrainModel(tiny_model_cfg(), o, vocab_size=V).train()
    tiled.load_state_dict(plain.state_dict())
    batch = make_batch()
    a, b = plain(batch), tiled(batch)
    torch.testing.assert_close(b["loss_contrastive"], a["loss_contrastive"], rtol=1e-5, atol=1e-6)
    a["loss"].backward()
    b["loss"].backward()
    for (name, pa), pb in zip(plain.named_parameters(), tiled.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------- 2 gloo ranks
