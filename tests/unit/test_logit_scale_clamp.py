"""The logit-scale ceiling (`objectives.contrastive.max_logit_scale`) holds for the value the forward reads,
also under bf16: a bf16 clamp to log(max) stores its round-to-nearest, which for max=200 is 5.3125 > 5.2983
(a forward scale of 202.9). fp32 keeps its clamp exactly as before. The plain-parameter tests run in this
process; the engine test runs the real `build_engine` (one rank, CPU) in a child process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_engine import preamble

from parallel.engine import ceiling_in, clamp_parameter_

ROOT = Path(__file__).resolve().parents[2]
CEIL = math.log(200.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_parameter_is_clamped_to_a_value_it_holds_below_the_ceiling(dtype):
    p = torch.nn.Parameter(torch.tensor([CEIL + 0.5, CEIL, CEIL - 0.5], dtype=dtype))
    clamp_parameter_(p, CEIL)
    assert (p.float().exp() <= 200.0).all(), p  # what PretrainModel.forward computes as its scale
    below = float(torch.tensor(CEIL - 0.5, dtype=dtype))
    assert p[2].item() == below  # below the ceiling: untouched
    top = ceiling_in(dtype, CEIL)  # the largest value of `dtype` at most the ceiling
    assert p[0].item() == p[1].item() == top <= CEIL
    up = torch.nextafter(torch.tensor(top, dtype=dtype), torch.tensor(math.inf, dtype=dtype))
    assert float(up) > CEIL


@pytest.mark.parametrize("max_scale", [200.0, 100.0, 10.0, 1 / 0.07])
def test_fp32_clamp_is_unchanged(max_scale):
    ceil = math.log(max_scale)
    assert ceiling_in(torch.float32, ceil) == ceil and ceiling_in(torch.float64, ceil) == ceil
    values = torch.tensor([ceil + 1.0, ceil, ceil - 1e-7, ceil - 1.0], dtype=torch.float32)
    p = torch.nn.Parameter(values.clone())
    clamp_parameter_(p, ceil)
    assert torch.equal(p.data, values.clamp(max=ceil))  # bit-identical to the plain clamp


SCRIPT = preamble(200.0) + r"""

def run(stage, precision):
    engine, p = engine_for(stage, precision, 10000)
    out = []
    for _ in range(6):  # the loss wants a larger scale: it reaches the ceiling and stays there
        loss = engine(torch.tensor(-1.0))
        engine.backward(loss)
        engine.step()
        clamp_parameter_(p, CEIL)
        master = safe_get_full_fp32_param(p)  # ZeRO 1-3; ZeRO 0 under bf16: the view build_engine links
        master = getattr(p, "_mmpt_fp32_master", None) if master is None else master
        # what PretrainModel.forward computes from the working copy
        out.append([float(p.float().exp().reshape(-1)[0]), float(p.data.float().reshape(-1)[0]),
                    None if master is None else float(master.reshape(-1)[0])])
    return out


groups.init_distributed(600, 1)
print(json.dumps([run(*case) for case in json.loads(sys.argv[1])]))
"""

CASES = [(0, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32")]


def test_through_the_engine_the_forward_scale_never_exceeds_the_ceiling():
    """At ZeRO 0-3 under bf16 the forward's scale stays <= 200 and the fp32 master sits at log(200) (at ZeRO 0
    DeepSpeed's FP16_UnfusedOptimizer master, which `safe_get_full_fp32_param` does not reach, is clamped too:
    unclamped it climbed to 5.52 in these 6 steps); fp32 clamps to fp32(log 200) as before."""
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for (stage, precision), trace in zip(CASES, results, strict=True):
        for scale, _, master in trace:
            assert scale <= 200.0 + (1e-4 if precision == "fp32" else 0.0), (stage, precision, trace)
            assert (master is None) == (precision == "fp32"), (stage, precision, trace)
            assert master is None or master <= CEIL + 1e-6, (stage, precision, trace)
        scale, work, master = trace[-1]
        if precision == "bf16":  # at the ceiling: the master at log(200), the bf16 copy just below it
            assert master == pytest.approx(CEIL, abs=1e-6) and work == 5.28125, (stage, trace)
        else:  # fp32: the parameter is clamped to fp32(log 200), as before
            assert work == float(torch.tensor(CEIL, dtype=torch.float32)), trace


def test_a_fused_zero0_optimizer_links_each_parameter_to_its_slice_of_the_flat_master():
    """FP16_Optimizer (ZeRO 0 with a fused optimizer: CUDA only) keeps one flat fp32 master per group; each
    parameter gets the view of its own slice, so the clamp reaches exactly that parameter's master."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    from parallel.engine import _link_fp32_masters

    a = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    scale = torch.nn.Parameter(torch.full([1], CEIL, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = FP16_Optimizer.__new__(FP16_Optimizer)  # only the two attributes the link reads
    opt.fp16_groups = [[a, scale], [b]]
    flat = [torch.full([7], 9.0, requires_grad=True), torch.full([4], 9.0, requires_grad=True)]
    opt.fp32_groups_flat = flat
    _link_fp32_masters(opt)
    clamp_parameter_(scale, CEIL)
    assert flat[0][6].item() == pytest.approx(CEIL) and (flat[0][:6] == 9.0).all() and (flat[1] == 9.0).all()
    assert a._mmpt_fp32_master.shape == (2, 3) and b._mmpt_fp32_master.shape == (4,)
    assert scale.item() == ceiling_in(torch.bfloat16, CEIL)
