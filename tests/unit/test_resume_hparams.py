"""A resume keeps this run's optimizer hyper-parameters and takes the checkpoint's position
(pretrain/checkpoint/hparams.py): DeepSpeed's own load at ZeRO 0-3 (bf16 and fp32 wrappers), with
`optim.lr_mult` groups and a frozen parameter, through the real `build_engine` and `StartPoint` in a child
process (one CPU rank). The runs themselves, at the saved layout and through the universal copy:
tests/e2e/test_resume_overrides.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from tiny import ROOT

from pretrain.checkpoint.hparams import changed_keys
from pretrain.config import load_config

SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from torch import nn
from parallel import groups
from parallel.engine import build_engine
from parallel.settings import EngineSpec, OptimConfig, ParallelConfig
from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.resume import StartPoint

OLD = dict(lr=2e-3, weight_decay=0.05, betas=[0.9, 0.98], eps=1e-6)
NEW = dict(lr=2e-2, weight_decay=0.5, betas=[0.5, 0.6], eps=1e-4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.frozen = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return (self.b(self.a(x) + self.frozen(x)) ** 2).mean()


def engine(stage, precision, hyper):
    torch.manual_seed(0)
    optim = OptimConfig(warmup_steps=2, impl="torch", lr_mult={"b.*": 0.5}, **hyper)
    spec = EngineSpec(optim=optim, parallel=ParallelConfig(zero_stage=stage, persistence_threshold=0),
                      steps=6, micro_batch=1, grad_accum=1, grad_clip=0.0, precision=precision, seed=0)
    return build_engine(spec, Net(), 1)[0]


def state(e):
    lists = [e.optimizer.param_groups, e.lr_scheduler.optimizer.param_groups]
    if hasattr(e.optimizer, "optimizer"):
        lists.append(e.optimizer.optimizer.param_groups)
    return {"groups": [[[g["lr"], g["initial_lr"], g["weight_decay"], list(g["betas"]), g["eps"],
                         g.get("lr_mult", 1.0)] for g in gs] for gs in lists],
            "base_lrs": list(e.lr_scheduler.base_lrs), "last_epoch": e.lr_scheduler.last_epoch,
            "get_lr": e.get_lr()}


def case(stage, precision, root):
    e = engine(stage, precision, OLD)
    for _ in range(3):
        e.backward(e(torch.ones(4, 8, dtype=e.module.a.weight.dtype)))
        e.step()
    tag = ckpt.save_atomic(e, root, 3, {"step": 3})
    out = {}
    for name, hyper in (("same", OLD), ("new", NEW)):
        e = engine(stage, precision, hyper)
        StartPoint(target=(root, tag))._load(e)
        out[name] = state(e)
    e = engine(stage, precision, OLD)  # DeepSpeed's load alone: what "same" must equal, bit for bit
    ckpt.load_deepspeed(e, root, tag)
    out["deepspeed"] = state(e)
    return out


groups.init_distributed(600, 1)
results = []
for stage, precision in json.loads(sys.argv[1]):
    with tempfile.TemporaryDirectory() as d:
        results.append(case(stage, precision, Path(d)))
print(json.dumps(results))
"""

CASES = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")]


@pytest.fixture(scope="module")
def resumed() -> list[dict]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"zero{s}-{p}" for s, p in CASES])
def test_a_resume_with_new_hyper_parameters_applies_them_to_every_group_deepspeed_reads(resumed, index):
    """optim.lr x each group's lr_mult, weight decay (0 for the exempt groups), betas and eps of this run, in
    the wrapper's groups and the inner optimizer's, the scheduler's base rates, and the current rate from
    the schedule at the restored position (3 steps: warm-up over, cosine at (3-2)/4 of the way)."""
    got = resumed[index]["new"]
    assert got["last_epoch"] == 3
    fn = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))
    for groups in got["groups"]:
        assert len(groups) == 4  # (lr_mult 1, 0.5) x (decay, no decay); the frozen layer in none
        for lr, initial, wd, betas, eps, mult in groups:
            assert initial == pytest.approx(2e-2 * mult)
            assert lr == pytest.approx(2e-2 * mult * fn)
            assert wd in (0.5, 0.0) and betas == [0.5, 0.6] and eps == 1e-4
        assert sorted(g[2] for g in groups) == [0.0, 0.0, 0.5, 0.5]
    assert got["base_lrs"] == [g[1] for g in got["groups"][0]]
    assert got["get_lr"][0] == pytest.approx(2e-2 * fn)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"zero{s}-{p}" for s, p in CASES])
def test_a_resume_with_the_same_config_is_bit_identical_to_deepspeeds_load(resumed, index):
    assert resumed[index]["same"] == resumed[index]["deepspeed"]


def test_changed_keys_names_each_optimizer_and_schedule_key_that_differs():
    saved = load_config(None, ["optim.lr=2e-3", "optim.weight_decay=0.05"])
    same = load_config(None, ["optim.lr=2e-3", "optim.weight_decay=0.05", "optim.lr_mult={a: 0.5}"])
    assert changed_keys(saved, same) == []  # lr_mult changes the groups: resume.py routes it, not this
    now = load_config(None, ["optim.lr=2e-2", "optim.weight_decay=0.05", "optim.betas=[0.5,0.6]",
                             "train.steps=500"])
    assert changed_keys(saved, now) == [("optim.lr", 2e-3, 2e-2), ("optim.betas", [0.9, 0.98], [0.5, 0.6]),
                                        ("train.steps", saved.train.steps, 500)]
