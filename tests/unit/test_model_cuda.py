"""The model on a CUDA device (skipped without one): bf16 parameters as DeepSpeed's bf16 mode makes them,
SDPA's GPU kernels with the padding and causal masks, activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.config import DecoderConfig, ModelConfig, ObjectivesConfig, TextConfig, VisionConfig
from pretrain.models import PretrainModel
from pretrain.parallelize import set_activation_checkpointing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PAD, BOS, MASK, EOS = 0, 1, 2, 3
B, S, P, L, V = 8, 32, 8, 16, 120
N = (S // P) ** 2


def cfg() -> ModelConfig:
    return ModelConfig(image_size=S, embed_dim=32, vocab_pad_multiple=64,
                       vision=VisionConfig(patch_size=P, width=64, layers=2, heads=4),
                       text=TextConfig(width=64, layers=2, heads=4, context_length=L),
                       decoder=DecoderConfig(width=32, layers=1, heads=2))


def batch(device: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, L), generator=gen)
    ids[:, 0] = BOS
    for i in range(B):
        e = 3 + i
        ids[i, e], ids[i, e + 1:] = EOS, PAD
    mlm_input, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_input[:, 1:3], labels[:, 1:3] = MASK, ids[:, 1:3]
    out = {"image": torch.randn(B, 3, S, S, generator=gen), "text": ids, "mlm_input": mlm_input,
           "mlm_labels": labels, "patch_noise": torch.rand(B, N, generator=gen)}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


def test_cuda_fp32_matches_cpu_and_bf16_is_close():
    torch.manual_seed(0)
    cpu = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).train()
    ref = cpu(batch("cpu"))
    gpu = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    out = gpu(batch("cuda"))
    for k in ref:
        torch.testing.assert_close(out[k].cpu(), ref[k].detach(), rtol=1e-3, atol=1e-3, msg=k)
    bf = gpu.bfloat16()
    out = bf(batch("cuda", torch.bfloat16))
    for k in ref:
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k].cpu(), ref[k].detach(), rtol=0.05, atol=0.05, msg=k)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in bf.parameters())


def test_cuda_attention_masks_match_cpu():
    torch.manual_seed(0)
    cpu = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).eval()
    gpu = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    bf = copy.deepcopy(gpu).bfloat16()
    ids = batch("cpu")["mlm_input"]
    ids[0] = PAD  # an all-padding row
    with torch.no_grad():
        for causal in (True, False):
            a = cpu.text.forward_tokens(ids, causal=causal)
            b = gpu.text.forward_tokens(ids.cuda(), causal=causal).cpu()
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
            c = bf.text.forward_tokens(ids.cuda(), causal=causal).float().cpu()
            assert torch.isfinite(c).all()
            torch.testing.assert_close(c, a, rtol=0.1, atol=0.1)


def test_cuda_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    plain = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).cuda().train()
    ckpt = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V)
    set_activation_checkpointing(ckpt)
    ckpt = ckpt.cuda().train()
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        model(batch("cuda"))["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
