"""Fused and mixed-precision switches against the plain path: `model.attention` (sdpa vs math),
`optim.impl`, `train.compile`, `train.activation_checkpointing`, `train.precision` (bf16, fp16,
bf16_autocast) and `model.fused_layernorm`; plus the config errors for kernels this machine lacks.

Fast tests compare modules directly. Slow ones train a tiny model for a few steps through the real
`build_engine` (DeepSpeed ZeRO-3, one rank) in a child process (`tests/engines.py`), so the pytest process
never holds a process group or DeepSpeed's global state: one child for every run of the four tests that
always run here (`engine_runs`, one engine per run, each from its own seed), and one for fp16 (which may be
unsupported on CPU and then skips). The CUDA-only kernels (`deepspeed_fused`, `apex_fused`,
`model.fused_layernorm`, and fp16 on a GPU) are compared with the plain path in tests/unit/test_model_cuda.py,
which runs wherever a GPU exists (scripts/gpu_check.sh).

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_fused_paths.py.
"""

from __future__ import annotations

import pytest
import torch
from batches import FP16_START
from engines import mismatched, run_engines


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
ENGINE_RUNS = {  # test -> (steps, {run: overrides}), all trained in one child process by `engine_runs`
    "optim": (6, {
        "torch": ["optim.impl=torch"], "torch_fused": ["optim.impl=torch_fused"],
        "cpu_adam": ["optim.impl=cpu_adam"], "auto": ["optim.impl=auto"],
        "lr": ["optim.impl=torch", "optim.lr=2.2e-3"]}),  # the control: another learning rate
    "ckpt_math": (4, {
        "plain": [], "ckpt": ["train.activation_checkpointing=true"], "math": ["model.attention=math"],
        "both": ["train.activation_checkpointing=true", "model.attention=math"]}),
    "compile": (3, {  # one compiled run per code path: per block (under recomputation), whole model
        "eager": ["optim.impl=torch"],
        "compiled_ckpt": ["optim.impl=torch", "train.compile=true", "train.activation_checkpointing=true"],
        "compiled_model": ["optim.impl=torch", "train.compile=true", "train.compile_scope=model"]}),
    "bf16": (8, {
        "fp32": [], "bf16": ["train.precision=bf16"], "autocast": ["train.precision=bf16_autocast"]}),
}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory) -> dict[str, dict]:
    """test -> {run: result} for ENGINE_RUNS: one child process (one interpreter, DeepSpeed import and process
    group for all of them), each run its own engine from its own seed."""
    runs = {f"{test}/{name}": o for test, (_, named) in ENGINE_RUNS.items() for name, o in named.items()}
    steps = {f"{test}/{name}": n for test, (n, named) in ENGINE_RUNS.items() for name in named}
    res = run_engines(runs, steps, tmp_path_factory.mktemp("engine_runs"))
    return {test: {name: res[f"{test}/{name}"] for name in named} for test, (_, named) in ENGINE_RUNS.items()}


@pytest.mark.slow
def test_optimizer_impls_match_plain_torch_adamw(engine_runs):
    """torch (the reference), torch_fused and cpu_adam (JIT-built on first use, ~1 min) give the same
    parameters after 6 ZeRO-3 steps on the same model and batches."""
    res = engine_runs["optim"]
    ref = res["torch"]
    assert ref["optimizer"] == "AdamW" and not ref["fused"]
    assert res["torch_fused"]["optimizer"] == "AdamW" and res["torch_fused"]["fused"]
    assert res["cpu_adam"]["optimizer"] == "DeepSpeedCPUAdam" and res["cpu_adam"]["offload"]
    assert res["auto"]["fused"]  # CPU: torch_fused
    first = ref["losses"][0]
    assert ref["losses"][-1] < first  # it trains
    for name in ("torch_fused", "cpu_adam", "auto"):
        torch.testing.assert_close(res[name]["losses"], ref["losses"], rtol=1e-4, atol=1e-5, msg=name)
        assert not mismatched(ref["params"], res[name]["params"], 1e-4, 1e-5), name
    # the comparison can fail: a different learning rate moves the parameters far beyond that tolerance
    assert len(mismatched(ref["params"], res["lr"]["params"], 1e-4, 1e-5)) > 10


@pytest.mark.slow
def test_activation_checkpointing_and_math_attention_engine_runs_match(engine_runs):
    """Recomputation replays the same kernels (tight tolerance); the math attention differs from SDPA by
    rounding, which Adam amplifies on near-zero gradients (the optimizer tests' tolerance)."""
    res = engine_runs["ckpt_math"]
    for name, (rtol, atol) in {"ckpt": (1e-6, 1e-7), "math": (1e-4, 1e-5), "both": (1e-4, 1e-5)}.items():
        torch.testing.assert_close(res[name]["losses"], res["plain"]["losses"], rtol=1e-5, atol=1e-6,
                                   msg=name)
        assert not mismatched(res["plain"]["params"], res[name]["params"], rtol, atol), name


@pytest.mark.slow
def test_compile_engine_run_matches_eager(engine_runs):
    """ZeRO-3 (its parameter gathers run eagerly between compiled graphs), per block with activation
    checkpointing recomputing the compiled blocks, and the whole model through DeepSpeed's `engine.compile()`
    (`train.compile_scope=model`); same losses and parameters as eager after 3 steps.

    One compiled run per path (each costs ~30 s of inductor on CPU): the per-block run without activation
    checkpointing calls the same compiled blocks directly -- its forward is the checkpointed run's first
    pass -- and test_compiled_block_same_outputs_and_grads compares such a block's outputs and gradients
    with eager."""
    res = engine_runs["compile"]
    assert res["eager"]["compiled_blocks"] == 0 and res["eager"]["graphs"] == 0
    assert not res["eager"]["engine_compiled"]
    assert res["compiled_ckpt"]["compiled_blocks"] == 5  # 2 vision + 2 text + 1 decoder blocks
    assert not res["compiled_ckpt"]["engine_compiled"]
    # the engine's module itself (towers, decoder, heads, losses) is the one compiled module
    assert res["compiled_model"]["compiled_blocks"] == 1 and res["compiled_model"]["engine_compiled"]
    for name in ("compiled_ckpt", "compiled_model"):
        assert res[name]["graphs"] > 0  # dynamo really captured graphs
        torch.testing.assert_close(res[name]["losses"], res["eager"]["losses"], rtol=1e-4, atol=1e-5,
                                   msg=name)
        assert not mismatched(res["eager"]["params"], res[name]["params"], 1e-4, 1e-5), name


@pytest.mark.slow
def test_bf16_paths_train_and_track_fp32(engine_runs):
    """bf16 (bf16 params, fp32 master) and bf16_autocast (fp32 params, bf16 compute) both train, and
    their losses stay within a few percent of fp32 on the same batches."""
    res = engine_runs["bf16"]
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
        # fp16 first: where DeepSpeed's CPU accelerator refuses it, the child stops before training fp32
        res = run_engines({"fp16": ["train.precision=fp16", f"train.fp16_initial_scale_power={FP16_START}"],
                           "fp32": []}, 6, tmp_path)
    except AssertionError as e:
        if "fp16" in str(e) and "not supported" in str(e):
            pytest.skip("fp16 not supported by DeepSpeed's CPU accelerator")
        raise
    losses, ref = res["fp16"]["losses"], res["fp32"]["losses"]
    assert res["fp16"]["skipped_steps"] == 0  # every step updated the weights, as in fp32
    assert torch.isfinite(losses).all() and ((losses - ref).abs() / ref).max() < 0.05, (losses, ref)
