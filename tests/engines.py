"""Train the tests' small engine model for a few steps through the real `build_engine` (DeepSpeed, one
rank) in a child process -- this file run as a script -- once per named list of config overrides, so the
pytest process never holds a process group or DeepSpeed's global state. The engine runs on CUDA where torch
sees a GPU (DeepSpeed's accelerator), else on CPU. Used by tests/e2e/test_fused_paths.py (every switch
against the plain path on CPU) and tests/unit/test_model_cuda.py (the CUDA-only kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from batches import ENGINE_BASE, EOS, PAD, VOCAB, make_batch

ROOT = Path(__file__).resolve().parents[1]


def run_engines(runs: dict[str, list[str]], steps: int | dict[str, int], tmp_path: Path,
                timeout: float = 900) -> dict:
    """Train each named override list for `steps` steps (or `steps[name]`) in one child process; returns per
    run the losses and the final full parameters (as lists)."""
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.pt"
    spec.write_text(json.dumps({"runs": runs, "steps": steps, "out": str(out)}))
    path = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]  # it imports tests/batches.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
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
        steps = spec["steps"][name] if isinstance(spec["steps"], dict) else spec["steps"]
        for _ in range(steps):
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
                         "compiled_blocks": compiled, "engine_compiled": engine.is_compiled,
                         "skipped_steps": engine.skipped_steps,
                         "graphs": int(counters["stats"]["unique_graphs"]) - graphs_before}
        del engine, model
    torch.save(results, spec["out"])


def mismatched(a: dict, b: dict, rtol: float, atol: float) -> list[str]:
    """Names of the parameters where `b` is not within atol + rtol * |a| of `a`, elementwise. An absolute
    term is needed: e.g. the key part of the QKV bias gets (numerically) zero gradient -- softmax ignores
    it -- so Adam moves it by m / sqrt(v) of rounding noise, differently in every kernel, by ~lr/1000."""
    return [n for n, t in a.items() if not torch.allclose(b[n], t, rtol=rtol, atol=atol)]


if __name__ == "__main__":
    _worker(sys.argv[1])
