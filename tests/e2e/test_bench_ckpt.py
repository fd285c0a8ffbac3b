"""`pretrain bench ckpt`: save / convert / load GB/s of a real ZeRO-3 checkpoint, and proof that conversion
streams: the converter's peak memory grows by far less than the model (it would grow by the whole
checkpoint, ~3x the fp32 model, if it loaded the files)."""

from __future__ import annotations

import json

import pytest
from tiny import run_pretrain

pytestmark = pytest.mark.slow

# ~51M parameters: 196 MB in fp32, ~600 MB of ZeRO-3 files (bf16 weights, fp32 master + 2 moments)
MODEL = ["model.vision.width=512", "model.vision.layers=8", "model.vision.heads=8", "model.text.width=512",
         "model.text.layers=8", "model.text.heads=8", "model.image_size=64", "train.micro_batch=4"]


@pytest.mark.timeout(600)
def test_bench_ckpt_reports_rates_and_conversion_streams(tmp_path):
    r = run_pretrain(["bench", "ckpt", "--json", "--workdir", str(tmp_path), *MODEL], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("save", "convert_universal", "load_universal", "load_deepspeed"):
        assert out[k]["bytes"] > 2.5 * out["fp32_model_mb"] * 2**20, k  # weights + master + moments
        assert out[k]["gb_per_s"] > 0 and out[k]["seconds"] > 0, k
    conv = out["convert_universal"]
    grew = conv["peak_rss_mb"] - conv["rss_before_mb"]
    assert 0 < grew < 0.6 * out["fp32_model_mb"], (grew, out["fp32_model_mb"])
    assert list(tmp_path.iterdir()) == []  # temporary checkpoints removed
