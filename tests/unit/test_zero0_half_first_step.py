"""ZeRO 0 under bf16/fp16 takes the same optimizer steps as ZeRO 1: DeepSpeed's FP16_UnfusedOptimizer /
FP16_Optimizer create Adam's state with a zero-gradient step at construction, which left Adam's step count
one ahead (every early update bias-corrected for one step too many) and the masters decayed once;
`parallel.engine._undo_state_init_step` undoes it. The engines are the real `build_engine` (one rank,
CPU) in a child process; the masters are compared after each step. The memory measurement counts those
masters too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import torch
from torch import nn
from deepspeed.utils import safe_get_full_fp32_param
from parallel import groups
from parallel.engine import build_engine
from parallel.settings import EngineSpec, OptimConfig, ParallelConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return (self.norm(self.fc(x.to(self.fc.weight.dtype))).float() ** 2).mean()


def masters(engine, stage):
    out = []
    for p in engine.module.parameters():
        m = getattr(p, "_mmpt_fp32_master", None) if stage == 0 else safe_get_full_fp32_param(p)
        out.append(m.detach().float().reshape(-1).tolist())
    return out


def run(stage, precision):
    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", weight_decay=0.1, impl="torch")
    spec = EngineSpec(optim=optim, parallel=ParallelConfig(zero_stage=stage), steps=10, micro_batch=4,
                      grad_accum=1, grad_clip=0.0, precision=precision, seed=0)
    engine, _ = build_engine(spec, Net(), 1)
    gen = torch.Generator().manual_seed(1)
    trace = [masters(engine, stage)]
    for _ in range(3):
        loss = engine(torch.randn(4, 16, generator=gen))
        engine.backward(loss)
        engine.step()
        trace.append(masters(engine, stage))
    inner = engine.optimizer.optimizer
    steps = sorted({int(s["step"]) for s in inner.state.values()})
    return {"trace": trace, "adam_steps": steps}


groups.init_distributed(600, 1)
print(json.dumps({f"{s}-{p}": run(s, p) for s, p in json.loads(sys.argv[1])}))
"""


def test_zero0_bf16_steps_like_zero1():
    cases = [(0, "bf16"), (1, "bf16")]
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    z0, z1 = res["0-bf16"], res["1-bf16"]
    assert z0["adam_steps"] == [3], z0["adam_steps"]  # three steps taken, three counted (was 4)
    for step, (a, b) in enumerate(zip(z0["trace"], z1["trace"], strict=True)):
        for pa, pb in zip(a, b, strict=True):
            worst = max(abs(x - y) for x, y in zip(pa, pb, strict=True))
            # same bf16 gradients, same Adam: equal up to summation order (an update is ~1e-2 here)
            assert worst < 1e-5, (step, worst)


MEASURE = r"""
import json, sys
import torch
from torch import nn
from parallel import groups
from parallel.engine import build_engine
from parallel.memory import measure_model_states
from parallel.settings import EngineSpec, OptimConfig, ParallelConfig

groups.init_distributed(600, 1)
out = {}
for stage, precision in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, impl="torch")
    spec = EngineSpec(optim=optim, parallel=ParallelConfig(zero_stage=stage), steps=10, micro_batch=4,
                      grad_accum=1, grad_clip=0.0, precision=precision, seed=0)
    engine, _ = build_engine(spec, net, 1)
    loss = engine(torch.randn(4, 64).to(next(net.parameters()).dtype)).float().square().mean()
    engine.backward(loss)
    engine.step()
    m = measure_model_states(engine)
    out[f"{stage}-{precision}"] = {"optimizer": m["optimizer"], "n": sum(p.numel() for p in net.parameters())}
print(json.dumps(out))
"""


def test_measured_optimizer_bytes_count_the_zero0_fp32_masters():
    """`RUN_DIR/memory.json`'s measured optimizer bytes: Adam's two fp32 moments (8 bytes per parameter) plus,
    in bf16, the fp32 master (4 more) at every stage; at ZeRO 0 the FP16 wrapper's masters were missed (8)."""
    cases = [(0, "bf16"), (1, "bf16"), (0, "fp32")]
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # step counters add a few bytes per tensor; the per-parameter share is what the plan counts
    per_param = {k: v["optimizer"] // v["n"] for k, v in res.items()}
    assert per_param == {"0-bf16": 12, "1-bf16": 12, "0-fp32": 8}, res
