"""The model on a CUDA device (skipped without one): bf16 parameters as DeepSpeed's bf16 mode makes them,
SDPA's GPU kernels with the padding and causal masks, activation checkpointing; and the CUDA-only switches
against the plain path (`optim.impl=deepspeed_fused|apex_fused`, `train.precision=fp16` through the real
DeepSpeed engine, `model.fused_layernorm`). No CI machine has a GPU: these run in scripts/gpu_check.sh."""

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


# ------------------------------------------------ CUDA-only kernels against the plain path
# These run only where a GPU exists (scripts/gpu_check.sh runs this file); on CPU they skip, and a kernel
# the GPU machine lacks (apex, a CUDA toolkit for DeepSpeed's FusedAdam) skips naming what is missing.
def test_cuda_fused_adam_matches_plain_adamw(tmp_path):
    from engines import mismatched, run_engines

    from parallel.optimizers import optimizer_problem

    runs = {"torch": ["optim.impl=torch"]}
    missing = {}
    for impl in ("deepspeed_fused", "apex_fused"):
        problem = optimizer_problem(impl)
        if problem:
            missing[impl] = problem
        else:
            runs[impl] = [f"optim.impl={impl}"]
    if len(runs) == 1:
        pytest.skip(f"no fused Adam here: {missing}")
    res = run_engines(runs, 6, tmp_path)
    ref = res["torch"]
    assert ref["param_dtype"] == "torch.float32"  # ENGINE_BASE trains fp32: differences are the kernel's
    for impl in runs.keys() - {"torch"}:
        torch.testing.assert_close(res[impl]["losses"], ref["losses"], rtol=1e-4, atol=1e-5, msg=impl)
        assert not mismatched(ref["params"], res[impl]["params"], 1e-4, 1e-5), impl


def test_cuda_fp16_tracks_fp32(tmp_path):
    from batches import FP16_START
    from engines import run_engines

    res = run_engines({"fp32": [], "fp16": ["train.precision=fp16",
                                            f"train.fp16_initial_scale_power={FP16_START}"]}, 6, tmp_path)
    losses, ref = res["fp16"]["losses"], res["fp32"]["losses"]
    assert res["fp16"]["param_dtype"] == "torch.float16" and res["fp16"]["skipped_steps"] == 0
    assert torch.isfinite(losses).all() and ((losses - ref).abs() / ref).max() < 0.05, (losses, ref)
    assert not torch.equal(losses, ref)  # really another numeric path


def test_cuda_fused_layernorm_same_outputs_and_grads():
    from parallel.kernels import fuse_layer_norms, fused_layer_norm_problem

    problem = fused_layer_norm_problem()
    if problem:
        pytest.skip(problem)
    torch.manual_seed(0)
    plain = PretrainModel(cfg(), ObjectivesConfig(), vocab_size=V).cuda().train()
    fused = copy.deepcopy(plain)
    assert fuse_layer_norms(fused) > 0
    assert list(fused.state_dict()) == list(plain.state_dict())
    res = []
    for model in (plain, fused):
        out = model(batch("cuda"))
        out["loss"].backward()
        res.append((out, {n: p.grad for n, p in model.named_parameters()}))
    for k in res[0][0]:
        torch.testing.assert_close(res[1][0][k], res[0][0][k], rtol=1e-4, atol=1e-5, msg=k)
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, rtol=1e-3, atol=1e-5, msg=n)
