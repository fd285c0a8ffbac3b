"""`pretrain plan --gpu-mem GB`: the activation estimate, the workspace and the largest micro-batch that fits,
and the estimate checked against measured peaks of a real forward + backward on CPU.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_plan_memory.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pretrain.config import load_config
from pretrain.plan.memory import (
    memory_plan,
)

# the demo recipe's shapes: activations of a few MiB per sample, well above RSS noise at 16 vs 64 samples
DEMO = ["model.image_size=64", "model.vision.patch_size=8", "model.vision.width=128", "model.vision.layers=4",
        "model.vision.heads=4", "model.text.width=128", "model.text.layers=3", "model.text.heads=4",
        "model.text.context_length=32", "model.embed_dim=128", "model.decoder.width=64",
        "model.decoder.layers=2", "model.decoder.heads=4", "data.vocab_size=512", "train.precision=fp32",
        "objectives.mim.mask_ratio=0.5"]


# ------------------------------------------------------------------------------------ formulas


# ---------------------------------------------------------------------------------------- plan


# ---------------------------------------------------------------------------- against measurement
MEASURE = r"""
import json, sys
import torch
from pretrain.bench.step import synthetic_batches
from pretrain.config import load_config
from pretrain.models import PretrainModel
from pretrain.parallelize import set_activation_checkpointing

overrides = json.loads(sys.argv[1])
cfg = load_config(None, overrides)
torch.manual_seed(0)
model = PretrainModel.from_config(cfg).train()
set_activation_checkpointing(model, cfg.train.activation_checkpointing)
warm = load_config(None, [*overrides, "train.micro_batch=2"])  # kernels, thread pools, .grad buffers
model(next(synthetic_batches(warm, cfg.data.vocab_size)))["loss"].backward()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

batches = synthetic_batches(cfg, cfg.data.vocab_size, seed=1)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := VmRSS
model(next(batches))["loss"].backward()  # the batch is made inside the measured window
print(json.dumps({"peak_delta": status("VmHWM") - base}))
"""


def measured_peak(overrides: list[str]) -> int:
    """Peak RSS growth of one forward + backward in a fresh process. A fixed mmap threshold makes glibc
    map (and unmap) every large tensor, so freed warm-up memory cannot hide new allocations."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(overrides)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_delta"]


@pytest.mark.slow  # four fresh interpreters, ~30 s each on a loaded 2-core machine
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimated_bytes_per_sample_match_the_measured_slope(checkpointing):
    """Per-sample activation bytes of the estimate within 0.5-2x of the measured slope between two
    micro-batch sizes (what is not per sample: parameters, grads, thread pools, cancels in the slope)."""
    lo, hi = 16, 64
    base = [*DEMO, f"train.activation_checkpointing={str(checkpointing).lower()}"]
    peaks = {b: measured_peak([*base, f"train.micro_batch={b}"]) for b in (lo, hi)}
    slope = (peaks[hi] - peaks[lo]) / (hi - lo)
    key = "checkpointing" if checkpointing else "no_checkpointing"
    est = {b: memory_plan(load_config(None, [*base, f"train.micro_batch={b}"]), world=1)["activations"]
           for b in (lo, hi)}
    est_slope = (est[hi]["at_micro_batch_bytes"][key] - est[lo]["at_micro_batch_bytes"][key]) / (hi - lo)
    ratio = est_slope / slope
    print(f"checkpointing={checkpointing}: measured {slope / 2**20:.3f} MiB/sample, estimated "
          f"{est_slope / 2**20:.3f} MiB/sample, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.0, (slope, est_slope, peaks)
