"""`pretrain bench ckpt` units: its stage sizes are MB = 10^6 bytes (beside GB/s); the fp32 model size and
the converter's RSS are MiB and are labelled so (the model's MiB used to be printed as "MB")."""

from __future__ import annotations

from pretrain.bench import ckpt
from pretrain.cli import main

PARAMS = 51_400_000  # docs/benchmarks.md's model: 205.6 MB = 196.1 MiB


def test_model_size_names_its_units():
    size = ckpt.model_size(PARAMS)
    assert size["fp32_model_bytes"] == 4 * PARAMS
    assert size["fp32_model_mib"] == size["fp32_model_mb"] == 196.1  # the JSON key keeps its MiB value


def test_printed_sizes_say_mb_for_1e6_and_mib_for_2_20(monkeypatch, capsys):
    stage = {"bytes": 617_000_000, "seconds": 1.0, "gb_per_s": 0.617}
    out = {"params": PARAMS, **ckpt.model_size(PARAMS), "save": stage,
           "convert_universal": {**stage, "peak_rss_mb": 777.0}, "load_universal": stage,
           "load_deepspeed": stage}
    monkeypatch.setattr(ckpt, "run_ckpt_bench", lambda cfg, workdir: out)
    assert main(["bench", "ckpt"]) == 0
    text = capsys.readouterr().out
    assert "51.4M params (205.6 MB = 196.1 MiB fp32)" in text
    assert "617.0 MB in 1.000 s = 0.617 GB/s, peak RSS 777.0 MiB" in text
