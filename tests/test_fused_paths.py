"""Fused and mixed-precision switches against the plain path: `model.attention` (sdpa vs math),
`optim.impl`, `train.compile`, `train.activation_checkpointing`, `train.precision` (bf16, fp16,
bf16_autocast) and `model.fused_layernorm`; plus the config errors for kernels this machine lacks.

Fast tests compare modules directly. Slow ones train a tiny model for a few steps through the real
`build_engine` (DeepSpeed ZeRO-3, one rank) in a child process -- this file run as a script -- so the
pytest process never holds a process group or DeepSpeed's global state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAD, BOS, MASK, EOS = 0, 1, 2, 3
VOCAB = 100

# The shapes of tests/tiny.py's MICRO model (ZeRO-3, persistence 0 so every parameter is partitioned).
ENGINE_BASE = [
    "model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=2",
    "model.vision.heads=2", "model.text.width=32", "model.text.layers=2", "model.text.heads=2",
    "model.text.context_length=12", "model.embed_dim=16", "model.decoder.width=16", "model.decoder.layers=1",
    "model.decoder.heads=2", "model.vocab_pad_multiple=64", "train.micro_batch=4", "train.precision=fp32",
    "optim.warmup_steps=1", "optim.lr=2e-3", "optim.schedule=constant", "parallel.zero_stage=3",
    "parallel.persistence_threshold=0", "train.grad_clip=1.0",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def captions(gen: torch.Generator, b: int, length: int, vocab: int = VOCAB) -> torch.Tensor:
    """[b, length]: BOS, words, EOS at varying positions, PAD after it (row 0 has no padding)."""
    ids = torch.randint(4, vocab, (b, length), generator=gen)
    ids[:, 0] = BOS
    for r in range(b):
        eos = length - 1 - (r * 3) % (length - 2)
        ids[r, eos] = EOS
        ids[r, eos + 1:] = PAD
    return ids


def make_batch(gen: torch.Generator, b: int, image: int, patches: int, length: int
               ) -> dict[str, torch.Tensor]:
    ids = captions(gen, b, length)
    pick = (torch.rand(b, length, generator=gen) < 0.3) & (ids != PAD)
    labels = torch.where(pick, ids, -100)
    return {"image": torch.randn(b, 3, image, image, generator=gen), "text": ids,
            "mlm_input": torch.where(pick, MASK, ids), "mlm_labels": labels,
            "patch_noise": torch.rand(b, patches, generator=gen)}


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
    from pretrain.models.transformer import Attention, configure_kernels

    mc = small_model_cfg()
    torch.manual_seed(0)
    a = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    b = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    b.load_state_dict(a.state_dict())
    configure_kernels(b, attention="math")
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
    from pretrain.models.transformer import configure_kernels

    mc = small_model_cfg()
    torch.manual_seed(0)
    plain = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB).train()
    ckpt = PretrainModel(mc, ObjectivesConfig(), vocab_size=VOCAB, activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        configure_kernels(m, attention="math")
    batch = make_batch(torch.Generator().manual_seed(4), 4, 16, 16, 10)
    grads = []
    for m in (plain, ckpt):
        m(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0, msg=n)


def test_attention_choice_is_validated():
    from pretrain.config import ConfigError, load_config
    from pretrain.models.transformer import Attention, configure_kernels

    with pytest.raises(ConfigError, match="model.attention: 'flash' is not one of sdpa, math"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(ValueError, match="model.attention"):
        Attention(8, 2, attention="flash")
    with pytest.raises(ValueError, match="model.attention"):
        configure_kernels(nn.Linear(2, 2), attention="xformers")


# ---------------------------------------------------------------------------------- layer norm
def test_layer_norm_default_is_plain_and_fused_is_an_error_without_apex_or_cuda():
    from pretrain.models.layers import fuse_layer_norms, fused_layer_norm_problem, layer_norm

    assert type(layer_norm(8)) is nn.LayerNorm
    problem = fused_layer_norm_problem()
    if problem is None:
        pytest.skip("apex with CUDA is available here: see test_fused_layer_norm_keeps_parameters")
    assert "apex" in problem or "CUDA" in problem
    with pytest.raises(ValueError, match="model.fused_layernorm=true"):
        layer_norm(8, fused=True)
    with pytest.raises(ValueError, match="model.fused_layernorm=true"):
        fuse_layer_norms(nn.Sequential(nn.LayerNorm(8)))


def test_fused_layer_norm_keeps_parameters(monkeypatch):
    """The swap keeps the same Parameter objects under the same names (a stand-in class replaces apex
    here when it is missing; with apex + CUDA the real FusedLayerNorm is used)."""
    import pretrain.models.layers as layers
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
def test_build_engine_refuses_unavailable_kernels_before_deepspeed():
    from parallel.engine import build_engine
    from pretrain.config import ConfigError, load_config

    cfg = load_config(None, ["optim.impl=deepspeed_fused", "model.fused_layernorm=true"])
    with pytest.raises(ConfigError) as e:
        build_engine(cfg, nn.Linear(2, 2), 1)
    assert "optim.impl=deepspeed_fused" in str(e.value) and "model.fused_layernorm=true" in str(e.value)


def test_apex_absent_is_reported_even_with_cuda(monkeypatch):
    import importlib.util

    from parallel import optimizers
    from pretrain.models import layers

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
    from pretrain.config import load_config

    cfg = load_config(None, ["optim.lr=3e-4", "optim.weight_decay=0.05"])
    ds = deepspeed_config(cfg, 2, impl)
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
    from pretrain.config import load_config

    ds = deepspeed_config(load_config(None, [f"train.precision={precision}"]), 1, "torch")
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
@pytest.mark.slow
def test_compiled_block_same_outputs_and_grads():
    from pretrain.models.transformer import Transformer

    torch.manual_seed(0)
    eager = Transformer(32, 1, 2).train()
    comp = Transformer(32, 1, 2).train()
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks()
    assert list(comp.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefixes
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 5:] = True
    res = []
    for m in (eager, comp):
        xi = x.clone().requires_grad_(True)
        y = m(xi, False, pad)
        y.square().mean().backward()
        res.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-5, atol=1e-5)
    for n, g in res[0][2].items():
        torch.testing.assert_close(res[1][2][n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert comp.resblocks[0]._compiled_call_impl is not None


# ------------------------------------------------------------------------ DeepSpeed engine runs
def run_engines(runs: dict[str, list[str]], steps: int, tmp_path: Path, timeout: float = 900) -> dict:
    """Train each named override list for `steps` steps in one child process; returns per run the losses
    and the final full parameters (as lists)."""
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.pt"
    spec.write_text(json.dumps({"runs": runs, "steps": steps, "out": str(out)}))
    r = subprocess.run([sys.executable, __file__, str(spec)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(r.stdout[-3000:] + r.stderr[-5000:])
    return torch.load(out, weights_only=True)


def _worker(spec_path: str) -> None:
    import deepspeed

    from parallel import groups
    from parallel.engine import build_engine
    from pretrain.config import load_config
    from pretrain.models import PretrainModel

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    groups.init_distributed(600, 1)
    from torch._dynamo.utils import counters

    results: dict = {}
    for name, overrides in spec["runs"].items():
        torch._dynamo.reset()  # every run compiles its own graphs (inductor's disk cache keeps it quick)
        graphs_before = int(counters["stats"]["unique_graphs"])
        cfg = load_config(None, [*ENGINE_BASE, *overrides])
        m = cfg.model
        torch.manual_seed(cfg.train.seed)
        model = PretrainModel(m, cfg.objectives, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS,
                              activation_checkpointing=cfg.train.activation_checkpointing)
        engine, ds_cfg = build_engine(cfg, model, 1)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        gen = torch.Generator().manual_seed(123)
        losses = []
        engine.train()
        for _ in range(spec["steps"]):
            patches = (m.image_size // m.vision.patch_size) ** 2
            batch = make_batch(gen, cfg.train.micro_batch, m.image_size, patches, m.text.context_length)
            batch = {k: (v.to(engine.device, dtype) if v.is_floating_point() else v.to(engine.device))
                     for k, v in batch.items()}
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            losses.append(float(out["loss"]))
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=cfg.parallel.zero_stage == 3):
            full = {n: p.detach().float().clone().cpu() for n, p in engine.module.named_parameters()}
        basic = type(engine.basic_optimizer).__name__
        compiled = sum(getattr(mod, "_compiled_call_impl", None) is not None
                       for mod in engine.module.modules())
        fused = bool(getattr(engine.basic_optimizer, "defaults", {}).get("fused"))
        results[name] = {"losses": torch.tensor(losses, dtype=torch.float64), "params": full,
                         "optimizer": basic, "fused": fused,
                         "param_dtype": str(next(engine.module.parameters()).dtype),
                         "offload": "offload_optimizer" in ds_cfg["zero_optimization"],
                         "compiled_blocks": compiled,
                         "graphs": int(counters["stats"]["unique_graphs"]) - graphs_before}
        del engine, model
    torch.save(results, spec["out"])


def _mismatched(a: dict, b: dict, rtol: float, atol: float) -> list[str]:
    """Names of the parameters where `b` is not within atol + rtol * |a| of `a`, elementwise. An absolute
    term is needed: e.g. the key part of the QKV bias gets (numerically) zero gradient -- softmax ignores
    it -- so Adam moves it by m / sqrt(v) of rounding noise, differently in every kernel, by ~lr/1000."""
    return [n for n, t in a.items() if not torch.allclose(b[n], t, rtol=rtol, atol=atol)]


@pytest.mark.slow
def test_optimizer_impls_match_plain_torch_adamw(tmp_path):
    """torch (the reference), torch_fused and cpu_adam (JIT-built on first use, ~1 min) give the same
    parameters after 6 ZeRO-3 steps on the same model and batches."""
    steps = 6
    runs = {"torch": ["optim.impl=torch"], "torch_fused": ["optim.impl=torch_fused"],
            "cpu_adam": ["optim.impl=cpu_adam"], "auto": ["optim.impl=auto"]}
    res = run_engines(runs, steps, tmp_path)
    ref = res["torch"]
    assert ref["optimizer"] == "AdamW" and not ref["fused"]
    assert res["torch_fused"]["optimizer"] == "AdamW" and res["torch_fused"]["fused"]
    assert res["cpu_adam"]["optimizer"] == "DeepSpeedCPUAdam" and res["cpu_adam"]["offload"]
    assert res["auto"]["fused"]  # CPU: torch_fused
    first = ref["losses"][0]
    assert ref["losses"][-1] < first  # it trains
    for name in ("torch_fused", "cpu_adam", "auto"):
        torch.testing.assert_close(res[name]["losses"], ref["losses"], rtol=1e-4, atol=1e-5, msg=name)
        assert not _mismatched(ref["params"], res[name]["params"], 1e-4, 1e-5), name
    # the comparison can fail: a different learning rate moves the parameters far beyond that tolerance
    (tmp_path / "lr").mkdir()
    other = run_engines({"lr": ["optim.impl=torch", "optim.lr=2.2e-3"]}, steps, tmp_path / "lr")
    assert len(_mismatched(ref["params"], other["lr"]["params"], 1e-4, 1e-5)) > 10


@pytest.mark.slow
def test_activation_checkpointing_and_math_attention_engine_runs_match(tmp_path):
    """Recomputation replays the same kernels (tight tolerance); the math attention differs from SDPA by
    rounding, which Adam amplifies on near-zero gradients (the optimizer tests' tolerance)."""
    runs = {"plain": [], "ckpt": ["train.activation_checkpointing=true"], "math": ["model.attention=math"],
            "both": ["train.activation_checkpointing=true", "model.attention=math"]}
    res = run_engines(runs, 4, tmp_path)
    for name, (rtol, atol) in {"ckpt": (1e-6, 1e-7), "math": (1e-4, 1e-5), "both": (1e-4, 1e-5)}.items():
        torch.testing.assert_close(res[name]["losses"], res["plain"]["losses"], rtol=1e-5, atol=1e-6,
                                   msg=name)
        assert not _mismatched(res["plain"]["params"], res[name]["params"], rtol, atol), name


@pytest.mark.slow
def test_compile_engine_run_matches_eager(tmp_path):
    """ZeRO-3 (its parameter gathers run eagerly between compiled graphs), also with activation
    checkpointing recomputing the compiled blocks; same losses and parameters as eager after 3 steps."""
    runs = {"eager": ["optim.impl=torch"], "compiled": ["optim.impl=torch", "train.compile=true"],
            "compiled_ckpt": ["optim.impl=torch", "train.compile=true",
                              "train.activation_checkpointing=true"]}
    res = run_engines(runs, 3, tmp_path)
    assert res["eager"]["compiled_blocks"] == 0 and res["eager"]["graphs"] == 0
    for name in ("compiled", "compiled_ckpt"):
        assert res[name]["compiled_blocks"] == 5  # 2 vision + 2 text + 1 decoder blocks
        assert res[name]["graphs"] > 0  # dynamo really captured graphs
        torch.testing.assert_close(res[name]["losses"], res["eager"]["losses"], rtol=1e-4, atol=1e-5,
                                   msg=name)
        assert not _mismatched(res["eager"]["params"], res[name]["params"], 1e-4, 1e-5), name


@pytest.mark.slow
def test_bf16_paths_train_and_track_fp32(tmp_path):
    """bf16 (bf16 params, fp32 master) and bf16_autocast (fp32 params, bf16 compute) both train, and
    their losses stay within a few percent of fp32 on the same batches."""
    steps = 8
    runs = {"fp32": [], "bf16": ["train.precision=bf16"], "autocast": ["train.precision=bf16_autocast"]}
    res = run_engines(runs, steps, tmp_path)
    assert res["bf16"]["param_dtype"] == "torch.bfloat16"
    assert res["autocast"]["param_dtype"] == "torch.float32"
    ref = res["fp32"]["losses"]
    for name in ("bf16", "autocast"):
        losses = res[name]["losses"]
        assert torch.isfinite(losses).all(), name
        assert losses[-3:].mean() < losses[:2].mean(), (name, losses)  # it trains
        assert ((losses - ref).abs() / ref).max() < 0.05, (name, losses, ref)
        assert not torch.equal(losses, ref), name  # really another numeric path


@pytest.mark.slow
def test_fp16_trains_or_is_unsupported_on_cpu(tmp_path):
    try:
        res = run_engines({"fp32": [], "fp16": ["train.precision=fp16"]}, 6, tmp_path)
    except AssertionError as e:
        if "fp16" in str(e) and "not supported" in str(e):
            pytest.skip("fp16 not supported by DeepSpeed's CPU accelerator")
        raise
    losses, ref = res["fp16"]["losses"], res["fp32"]["losses"]
    assert torch.isfinite(losses).all() and ((losses - ref).abs() / ref).max() < 0.05


if __name__ == "__main__":
    _worker(sys.argv[1])
