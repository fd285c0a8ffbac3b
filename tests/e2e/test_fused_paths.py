"""Fused and mixed-precision switches against the plain path: `model.attention` (sdpa vs math),
`optim.impl`, `train.compile`, `train.activation_checkpointing`, `train.precision` (bf16, fp16,
bf16_autocast) and `model.fused_layernorm`; plus the config errors for kernels this machine lacks.

Fast tests compare modules directly. Slow ones train a tiny model for a few steps through the real
`build_engine` (DeepSpeed ZeRO-3, one rank) in a child process -- this file run as a script -- so the
pytest process never holds a process group or DeepSpeed's global state.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_fused_paths.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batches import EOS, PAD, VOCAB, make_batch

ROOT = Path(__file__).resolve().parents[2]

# The shapes of tests/tiny.py's MICRO model (ZeRO-3, persistence 0 so every parameter is partitioned).
ENGINE_BASE = [
    "model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=2",
    "model.vision.heads=2", "model.text.width=32", "model.text.layers=2", "model.text.heads=2",
    "model.text.context_length=12", "model.embed_dim=16", "model.decoder.width=16", "model.decoder.layers=1",
    "model.decoder.heads=2", "model.vocab_pad_multiple=64", "train.micro_batch=4", "train.precision=fp32",
    "optim.warmup_steps=1", "optim.lr=2e-3", "optim.schedule=constant", "parallel.zero_stage=3",
    "parallel.persistence_threshold=0", "train.grad_clip=1.0",
]


def test_compiled_block_same_outputs_and_grads():
    from pretrain.models.transformer import Transformer
    from pretrain.parallelize import compile_blocks

    torch.manual_seed(0)
    eager = Transformer(32, 1, 2).train()
    comp = Transformer(32, 1, 2).train()
    comp.load_state_dict(eager.state_dict())
    compile_blocks(comp)
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
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # the script imports tests/batches.py
    r = subprocess.run([sys.executable, __file__, str(spec)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode != 0:
        raise AssertionError(r.stdout[-3000:] + r.stderr[-5000:])
    return torch.load(out, weights_only=True)


def _worker(spec_path: str) -> None:
    import deepspeed

    from parallel import groups
    from parallel.engine import build_engine
    from pretrain.config import engine_spec, load_config
    from pretrain.models import PretrainModel
    from pretrain.parallelize import parallelize

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
        model = PretrainModel(m, cfg.objectives, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS)
        engine, ds_cfg = build_engine(engine_spec(cfg), parallelize(model, cfg), 1)
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
