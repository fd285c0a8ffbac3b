"""`train.fp8`: torchao's Float8Linear in the transformer blocks, checked against the bf16 model it replaces
(loss agreement over a few AdamW steps). On a CPU torch emulates the fp8 matmuls; scripts/gpu_check.sh runs
this file on the lent GPU, where they run on fp8 tensor cores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parallel.kernels import fp8_linears, fp8_problem
from pretrain.config import ConfigError, load_config
from pretrain.models import PretrainModel
from pretrain.parallelize import transformer_blocks

pytestmark = pytest.mark.skipif(fp8_problem() is not None, reason=str(fp8_problem()))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ["model.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.layers=2",
         "model.vision.heads=2", "model.text.width=32", "model.text.layers=2", "model.text.heads=2",
         "model.text.context_length=16", "model.embed_dim=32", "model.decoder.width=32",
         "model.decoder.layers=1", "model.decoder.heads=2", "data.vocab_size=128", "train.precision=bf16"]


def _model() -> PretrainModel:
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    return PretrainModel.from_config(cfg, vocab_size=128).to(DEVICE, torch.bfloat16).train()


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (8, 16), generator=g)
    ids[:, 0], ids[:, 12], ids[:, 13:] = 1, 3, 0
    mlm, labels = ids.clone(), torch.full_like(ids, -100)
    mlm[:, 2:5], labels[:, 2:5] = 2, ids[:, 2:5]
    b = {"image": torch.randn(8, 3, 32, 32, generator=g).bfloat16(), "text": ids, "mlm_input": mlm,
         "mlm_labels": labels, "patch_noise": torch.rand(8, 16, generator=g)}
    return {k: v.to(DEVICE) for k, v in b.items()}


def test_fp8_converts_the_block_linears_and_keeps_every_name():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    want = sum(1 for b in transformer_blocks(model) for m in b.modules()
               if type(m) is nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0)
    assert fp8_linears(transformer_blocks(model)) == want > 0
    from torchao.float8.float8_linear import Float8Linear

    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == want
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and optimizer groups unchanged
    assert not isinstance(model.mlm_head.decoder, Float8Linear)  # outside the blocks: bf16


def test_fp8_losses_track_bf16_over_adamw_steps():
    ref = _model()
    fp8 = copy.deepcopy(ref)
    fp8_linears(transformer_blocks(fp8))
    losses = {}
    for name, model in (("bf16", ref), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for step in range(4):
            loss = model(_batch(step % 2))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach()))
        losses[name] = out
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["bf16"], losses["fp8"])]
    assert max(rel) < 0.02, losses  # fp8's e4m3/e5m2 rounding, not another model
    assert losses["fp8"][-1] < losses["fp8"][0]  # and it trains
    assert losses["bf16"] != losses["fp8"]  # the fp8 path really ran


@pytest.mark.parametrize("overrides", [["train.precision=fp32"], ["parallel.tp=2"]])
def test_config_refuses_fp8_where_it_cannot_replace_the_matmuls(overrides):
    with pytest.raises(ConfigError, match="train.fp8=true needs train.precision=bf16 and parallel.tp=1"):
        load_config(None, [*SMALL, "train.fp8=true", *overrides])
