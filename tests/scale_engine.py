"""The script preamble both logit-scale tests run in a child process (tests/unit/test_logit_scale_clamp.py,
tests/e2e/test_logit_scale.py): a module whose only trained value is a logit scale, and a real DeepSpeed
engine around it (`engine_for`): the clamp is checked where DeepSpeed keeps its working and master copies."""

from __future__ import annotations

_PREAMBLE = r"""
import json, math, sys
import torch
from torch import nn
from deepspeed.utils import safe_get_full_fp32_param
from parallel import groups
from parallel.engine import build_engine, clamp_parameter_
from parallel.settings import EngineSpec, OptimConfig, ParallelConfig

CEIL = math.log(MAX_SCALE)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full([1], CEIL - 0.05))
        self.other = nn.Linear(8, 8)

    def forward(self, sign):
        return sign * self.logit_scale.exp().sum() + 0.0 * self.other.weight.float().sum()


def engine_for(stage, precision, threshold):
    torch.manual_seed(0)
    optim = OptimConfig(lr=0.05, warmup_steps=0, schedule="constant", weight_decay=0.0, impl="torch")
    spec = EngineSpec(optim=optim,
                      parallel=ParallelConfig(zero_stage=stage, persistence_threshold=threshold), steps=100,
                      micro_batch=1, grad_accum=1, grad_clip=0.0, precision=precision, seed=0)
    engine, _ = build_engine(spec, Scale(), 1)
    return engine, engine.module.logit_scale
"""


def preamble(max_scale: float) -> str:
    """Imports, `CEIL` = log(`max_scale`), the `Scale` module and `engine_for(stage, precision, thr)`."""
    return _PREAMBLE.replace("MAX_SCALE", repr(float(max_scale)))
