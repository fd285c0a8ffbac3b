"""Fused and mixed-precision switches against the plain path: `model.attention` (sdpa vs math),
`optim.impl`, `train.compile`, `train.activation_checkpointing`, `train.precision` (bf16, fp16,
bf16_autocast) and `model.fused_layernorm`; plus the config errors for kernels this machine lacks.

What CPU cannot check: `optim.impl=deepspeed_fused|apex_fused` and `model.fused_layernorm=true` are CUDA
kernels. Here the layer-norm swap is tested with a stand-in class (not apex) and the fused optimizers only
through their config errors; tests/unit/test_model_cuda.py compares the real kernels (and fp16 on a GPU)
with the plain path wherever a GPU exists.

Fast tests compare modules directly. Slow ones train a tiny model for a few steps through the real
`build_engine` (DeepSpeed ZeRO-3, one rank) in a child process -- this file run as a script -- so the
pytest process never holds a process group or DeepSpeed's global state.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_fused_paths.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import ENGINE_BASE, EOS, FP16_START, PAD, VOCAB, make_batch
from torch import nn


def small_model_cfg():
    from pretrain.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig

    return ModelConfig(image_size=16, embed_dim=16,
                       vision=VisionConfig(patch_size=4, width=32, layers=2, heads=4),
                       text=TextConfig(width=32, layers=2, heads=4, context_length=10),
                       decoder=DecoderConfig(width=16, layers=1, heads=2))


# ------------------------------------------------------------------------------------- attention
def _attention_pair(width=32, heads=4):
    from pretrain.models.transformer import Attention

    torch.manual_seed(0)
    sdpa = Attention(width, heads, attention="sdpa")
    math_ = Attention(width, heads, attention="math")
    math_.load_state_dict(sdpa.state_dict())
    return sdpa, math_


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_math_attention_matches_sdpa_outputs_and_grads(causal, padded):
    sdpa, math_ = _attention_pair()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=gen)
    pad = None
    if padded:  # row 0 unpadded, row 1 half padding, row 2 all padding (attends everywhere, no NaN)
        pad = torch.zeros(3, 10, dtype=torch.bool)
        pad[1, 5:] = True
        pad[2, :] = True
    outs, grads = [], []
    for mod in (sdpa, math_):
        xi = x.clone().requires_grad_(True)
        y = mod(xi, causal, pad)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads[0], grads[1]):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-5)


def test_math_attention_really_masks():
    """The reference is not vacuous: causal output at t ignores later tokens, padding keys are ignored."""
    from pretrain.models.transformer import math_attention

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    v2 = v.clone()
    v2[..., 3:, :] += 10.0  # change later values
    a = math_attention(q, k, v, is_causal=True)
    b = math_attention(q, k, v2, is_causal=True)
    assert torch.equal(a[..., :3, :], b[..., :3, :]) and not torch.allclose(a[..., 3:, :], b[..., 3:, :])
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    keep[..., 4:] = False
    c = math_attention(q, k, v, attn_mask=keep)
    ref = F.softmax((q @ k.transpose(-2, -1))[..., :4] / 2.0, dim=-1) @ v[..., :4, :]  # sqrt(4) = 2
    torch.testing.assert_close(c, ref)


def test_pretrain_model_math_attention_same_loss_and_grads():
    """Whole model, both text passes (causal, and bidirectional with padding) and the MAE decoder."""
    from pretrain.config import ObjectivesConfig
    from pretrain.models import PretrainModel
    from pretrain.models.transformer import Attention
    from pretrain.parallelize import set_attention

    mc = small_model_cfg()
    torch.manual_seed(0)
    a = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    b = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    b.load_state_dict(a.state_dict())
    set_attention(b, "math")
    assert {m.attention for m in b.modules() if isinstance(m, Attention)} == {"math"}
    assert list(a.state_dict()) == list(b.state_dict())
    batch = make_batch(torch.Generator().manual_seed(3), 4, 16, 16, 10)
    assert (batch["mlm_input"] == PAD).any()  # the MLM pass really masks padding
    res = []
    for m in (a, b):
        out = m(batch)
        out["loss"].backward()
        res.append((out, {n: p.grad for n, p in m.named_parameters()}))
    for k in ("loss", "loss_contrastive", "loss_mim", "loss_mlm"):
        torch.testing.assert_close(res[1][0][k], res[0][0][k], rtol=1e-5, atol=1e-5)
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, rtol=1e-5, atol=1e-5, msg=n)


def test_activation_checkpointing_same_grads_with_math_attention():
    from pretrain.config import ObjectivesConfig
    from pretrain.models import PretrainModel
    from pretrain.parallelize import set_activation_checkpointing, set_attention

    mc = small_model_cfg()
    torch.manual_seed(0)
    plain = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    ckpt = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    set_activation_checkpointing(ckpt)
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        set_attention(m, "math")
    batch = make_batch(torch.Generator().manual_seed(4), 4, 16, 16, 10)
    grads = []
    for m in (plain, ckpt):
        m(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0, msg=n)


def test_attention_choice_is_validated():
    from pretrain.config import ConfigError, load_config
    from pretrain.models.transformer import Attention
    from pretrain.parallelize import set_attention

    with pytest.raises(ConfigError, match="model.attention: 'flash' is not one of sdpa, math"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(ValueError, match="model.attention"):
        Attention(8, 2, attention="flash")
    with pytest.raises(ValueError, match="model.attention"):
        set_attention(nn.Linear(2, 2), "xformers")


# ---------------------------------------------------------------------------------- layer norm
def test_layer_norm_default_is_plain_and_fused_is_an_error_without_apex_or_cuda():
    from parallel.kernels import fuse_layer_norms, fused_layer_norm_problem
    from pretrain.models.transformer import layer_norm

    assert type(layer_norm(8)) is nn.LayerNorm
    problem = fused_layer_norm_problem()
    if problem is None:
        pytest.skip("apex with CUDA is available here: see test_fused_layer_norm_keeps_parameters")
    assert "apex" in problem or "CUDA" in problem
    with pytest.raises(ValueError, match="model.fused_layernorm=true"):
        fuse_layer_norms(nn.Sequential(nn.LayerNorm(8)))


def test_fused_layer_norm_keeps_parameters(monkeypatch):
    """The swap keeps the same Parameter objects under the same names (a stand-in class replaces apex
    here when it is missing; with apex + CUDA the real FusedLayerNorm is used)."""
    import parallel.kernels as layers
    from pretrain.models.transformer import Block

    if layers.fused_layer_norm_problem() is not None:
        class StandIn(nn.LayerNorm):
            pass
        monkeypatch.setattr(layers, "_fused_layer_norm_cls", lambda: StandIn)
        cls = StandIn
    else:
        cls = layers._fused_layer_norm_cls()
    torch.manual_seed(0)
    blk = Block(16, 2)
    before = dict(blk.named_parameters())
    shapes = {n: p.shape for n, p in blk.state_dict().items()}
    assert layers.fuse_layer_norms(blk) == 2
    assert isinstance(blk.ln_1, cls) and isinstance(blk.ln_2, cls)
    after = dict(blk.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert {n: p.shape for n, p in blk.state_dict().items()} == shapes


# ---------------------------------------------------------------------------------- config keys
def test_new_keys_have_defaults_and_choices():
    from pretrain.config import CHOICES, Config

    c = Config()
    assert (c.optim.impl, c.model.attention, c.model.fused_layernorm, c.train.compile) == ("auto", "sdpa",
                                                                                            False, False)
    assert CHOICES["optim.impl"] == ("auto", "torch", "torch_fused", "deepspeed_fused", "apex_fused",
                                     "cpu_adam")
    assert "bf16_autocast" in CHOICES["train.precision"]


@pytest.mark.parametrize("override,needle", [
    ("optim.impl=fused", "optim.impl: 'fused' is not one of auto, torch, torch_fused, deepspeed_fused"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of bf16, fp16, fp32, bf16_autocast"),
    ("train.compile=maybe", "train.compile: expected true or false"),
    ("model.fused_layernorm=1", "model.fused_layernorm: expected true or false"),
])
def test_bad_values_name_the_key(override, needle):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_cpu_adam_needs_zero():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optim.impl=cpu_adam .* parallel.zero_stage >= 1"):
        load_config(None, ["optim.impl=cpu_adam", "parallel.zero_stage=0"])
    load_config(None, ["optim.impl=cpu_adam", "parallel.zero_stage=2"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("override,needle", [
    ("optim.impl=deepspeed_fused", "optim.impl=deepspeed_fused: DeepSpeed FusedAdam is a CUDA kernel"),
    ("optim.impl=apex_fused", "optim.impl=apex_fused: apex"),
    ("model.fused_layernorm=true", "model.fused_layernorm=true: apex"),
])
def test_unavailable_kernels_are_config_errors_naming_the_key(override, needle):
    from pretrain.config import ConfigError, check_runtime, load_config

    cfg = load_config(None, [override])  # machine-independent validation passes (eval/plan elsewhere)
    with pytest.raises(ConfigError) as e:
        check_runtime(cfg)
    msg = str(e.value)
    assert needle in msg, msg
    assert "set model.fused_layernorm=false" in msg or "use optim.impl=auto" in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_parallelize_refuses_unavailable_kernels_before_deepspeed():
    from pretrain.config import ConfigError, load_config
    from pretrain.parallelize import parallelize

    cfg = load_config(None, ["optim.impl=deepspeed_fused", "model.fused_layernorm=true"])
    with pytest.raises(ConfigError) as e:
        parallelize(nn.Linear(2, 2), cfg)  # the step before build_engine in train and bench
    assert "optim.impl=deepspeed_fused" in str(e.value) and "model.fused_layernorm=true" in str(e.value)


def test_apex_absent_is_reported_even_with_cuda(monkeypatch):
    import importlib.util

    from parallel import kernels as layers
    from parallel import optimizers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "apex" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "apex is not installed" in optimizers.optimizer_problem("apex_fused")
    assert "optim.impl=apex_fused" in optimizers.optimizer_problem("apex_fused")
    assert "apex is not installed" in layers.fused_layer_norm_problem()


def test_available_impls_pass_runtime_check_and_auto_resolves():
    from parallel import optimizers
    from pretrain.config import check_runtime, load_config

    for impl in ("auto", "torch", "torch_fused", "cpu_adam"):
        check_runtime(load_config(None, [f"optim.impl={impl}"]))
    expect = "torch_fused"
    if torch.cuda.is_available() and optimizers.optimizer_problem("deepspeed_fused") is None:
        expect = "deepspeed_fused"
    assert optimizers.resolve_impl("auto") == expect
    assert optimizers.resolve_impl("torch") == "torch"


def test_auto_falls_back_to_torch_without_fused_kernels(monkeypatch):
    from parallel import optimizers

    monkeypatch.setattr(optimizers, "device_type", lambda: "cpu")
    monkeypatch.setattr(optimizers, "torch_fused_supported", lambda device: False)
    assert optimizers.resolve_impl("auto") == "torch"
    assert "no fused AdamW kernel" in optimizers.optimizer_problem("torch_fused")


@pytest.mark.parametrize("impl,has_section,torch_adam,offload", [
    ("torch", True, True, False), ("torch_fused", False, None, False),
    ("deepspeed_fused", True, False, False), ("cpu_adam", True, False, True),
])
def test_deepspeed_config_per_impl(impl, has_section, torch_adam, offload):
    from parallel.engine import deepspeed_config
    from pretrain.config import engine_spec, load_config

    cfg = load_config(None, ["optim.lr=3e-4", "optim.weight_decay=0.05"])
    ds = deepspeed_config(engine_spec(cfg), 2, impl)
    assert ("optimizer" in ds) == has_section
    if has_section:
        params = ds["optimizer"]["params"]
        assert ds["optimizer"]["type"] == "AdamW" and params["adam_w_mode"] is True
        assert params["lr"] == 3e-4 and params["weight_decay"] == 0.05
        assert params.get("torch_adam", False) is torch_adam
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    if offload:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("precision,bf16,fp16,autocast", [
    ("fp32", False, False, False), ("bf16", True, False, False), ("fp16", False, True, False),
    ("bf16_autocast", False, False, True),
])
def test_deepspeed_config_per_precision(precision, bf16, fp16, autocast):
    from parallel.engine import deepspeed_config
    from pretrain.config import engine_spec, load_config

    ds = deepspeed_config(engine_spec(load_config(None, [f"train.precision={precision}"])), 1, "torch")
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16
    assert ("torch_autocast" in ds) == autocast
    if autocast:
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_torch_fused_client_optimizer_matches_plain_adamw():
    """The optimizer objects themselves, outside DeepSpeed: same updates after several steps."""
    from parallel import optimizers
    from pretrain.config import OptimConfig

    o = OptimConfig(lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(5, 7, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(5)]
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, **optimizers.adamw_kwargs(o)),
                 optimizers.client_optimizer("torch_fused", o)):
        p = nn.Parameter(init.clone())
        opt = make([{"params": [p], "weight_decay": o.weight_decay}])
        if make is not None and getattr(opt, "defaults", {}).get("fused"):
            assert opt.defaults["fused"] is True
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    assert not torch.equal(results[0], init)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- compile


# ------------------------------------------------------------------------ DeepSpeed engine runs


# ------------------------------------------------------------------------------------ fp16 start scale
def test_fp16_start_scale_fits_the_engine_model_gradients():
    """Why tests/e2e's fp16 engine run starts at 2^FP16_START: at DeepSpeed's default 2^16 the first scaled
    fp16 backward of that model overflows (ZeRO then skips the step; five such steps made fp16 look like it
    diverged from fp32), at 2^FP16_START it stays finite. fp16 CPU kernels exist on every x86 CPU (through
    fp32 where the CPU has no native fp16)."""
    from pretrain.config import load_config
    from pretrain.models import PretrainModel

    cfg = load_config(None, ENGINE_BASE)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = PretrainModel(m, cfg.objectives, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS).half().train()
    patches = (m.image_size // m.vision.patch_size) ** 2
    batch = make_batch(torch.Generator().manual_seed(123), cfg.train.micro_batch, m.image_size, patches,
                       m.text.context_length)  # the engine runs' first batch
    batch = {k: (v.half() if v.is_floating_point() else v) for k, v in batch.items()}

    def finite_grads(scale: float) -> bool:
        model.zero_grad(set_to_none=True)
        (model(batch)["loss"] * scale).backward()  # what DeepSpeed's fp16 engine.backward does
        return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)

    assert not finite_grads(2.0 ** 16)
    assert finite_grads(2.0 ** FP16_START)


def test_fp16_initial_scale_power_reaches_deepspeed():
    from parallel.engine import deepspeed_config
    from pretrain.config import ConfigError, engine_spec, load_config

    cfg = load_config(None, ["train.precision=fp16", "train.fp16_initial_scale_power=10"])
    assert deepspeed_config(engine_spec(cfg), 1, "torch")["fp16"]["initial_scale_power"] == 10
    with pytest.raises(ConfigError, match="train.fp16_initial_scale_power"):
        load_config(None, ["train.fp16_initial_scale_power=40"])


def test_deepspeed_sees_an_arch_list_it_can_parse(monkeypatch):
    """CUDA images set TORCH_CUDA_ARCH_LIST='... 9.0a ...'; DeepSpeed 0.19.8's JIT builder died on the
    suffix, so optim.impl=auto could not build FusedAdam on the H200. Its own sort is the check here."""
    import os

    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, also on a CPU box

    from parallel.optimizers import deepspeed_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0a;10.0f+PTX")
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    with pytest.raises(ValueError, match="invalid literal"):
        builder.compute_capability_args()
    with deepspeed_arch_list():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;9.0;10.0+PTX"
        builder.compute_capability_args()  # parses and sorts the list (the nvcc flags need a GPU here)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;9.0a;10.0f+PTX"
