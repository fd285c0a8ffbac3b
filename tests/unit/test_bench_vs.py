"""`pretrain bench step --vs open_clip`: the open_clip side is the same CLIP (parameter for parameter), its
numbers and the ratio land in the JSON, and a missing open_clip is a clear error. No timing assertions.

The single-process tests; the multi-process and end-to-end ones are in tests/e2e/test_bench_vs.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from pretrain.bench.step import synthetic_batches
from pretrain.bench.vs_open_clip import (
    OpenClipUnavailable,
    build_open_clip,
    compare,
    import_open_clip,
    open_clip_flops,
    run_open_clip,
    shared_parameter_count,
)
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.models import PretrainModel
from pretrain.plan.flops import flops_per_sample

TINY = ["model.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=2",
        "model.vision.heads=4", "model.text.width=32", "model.text.layers=2", "model.text.heads=4",
        "model.text.context_length=8", "model.embed_dim=16", "model.decoder.width=16",
        "model.decoder.layers=1", "model.decoder.heads=2", "data.vocab_size=100", "train.micro_batch=4",
        "train.precision=fp32"]


def _ours(cfg):
    torch.manual_seed(0)
    return PretrainModel.from_config(cfg)


@pytest.mark.parametrize("extra", [[], ["objectives.contrastive.loss=siglip"],
                                   ["model.activation=quick_gelu", "model.mlp_ratio=2.0"],
                                   ["objectives.mim.weight=0", "objectives.mlm.weight=0"]])
def test_open_clip_model_has_exactly_our_clip_parameters(extra):
    pytest.importorskip("open_clip")
    cfg = load_config(None, [*TINY, *extra])
    ours = _ours(cfg)
    theirs = build_open_clip(cfg, ours.vocab_size)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    only_ours = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("decoder.", "mlm_head.")))
    assert shared_parameter_count(ours) == n_theirs == n_ours - only_ours
    # the towers themselves, module by module
    vis_theirs = sum(p.numel() for p in theirs.visual.parameters())
    assert vis_theirs == sum(p.numel() for p in ours.visual.parameters())
    bias = theirs.logit_bias.numel() if theirs.logit_bias is not None else 0
    text_theirs = n_theirs - vis_theirs - theirs.logit_scale.numel() - bias
    assert text_theirs == sum(p.numel() for p in ours.text.parameters())
    blk = theirs.visual.transformer.resblocks[0]
    assert blk.attn.num_heads == cfg.model.vision.heads
    assert blk.mlp.c_fc.out_features == int(cfg.model.vision.width * cfg.model.mlp_ratio)
    act = type(blk.mlp.gelu).__name__
    assert act == ("QuickGELU" if cfg.model.activation == "quick_gelu" else "GELU")
    assert (theirs.logit_bias is not None) == (cfg.objectives.contrastive.loss == "siglip")


def test_run_open_clip_reports_throughput_split_and_flops():
    pytest.importorskip("open_clip")
    cfg = load_config(None, TINY)
    for p in (0.0, 0.5):
        res = run_open_clip(cfg, 128, synthetic_batches(cfg, 100), torch.device("cpu"), steps=2, warmup=1,
                            patch_dropout=p)
        assert res["samples"] == 2 * 4 and res["samples_per_s"] > 0 and res["patch_dropout"] == p
        assert set(res["time_s"]) == {"data", "forward", "backward", "optimizer"}
        assert sum(res["time_s"].values()) <= res["wall_s"] * 1.01
        assert res["loss"] == "ClipLoss" and res["precision_mode"] == "fp32"
        assert torch.isfinite(torch.tensor(res["final_loss"]))
    # FLOPs of the open_clip side: contrastive only, int(N * (1 - p)) patches seen
    full, half = open_clip_flops(cfg, 128, 0.0), open_clip_flops(cfg, 128, 0.5)
    con = load_config(None, [*TINY, "objectives.mim.weight=0", "objectives.mlm.weight=0",
                             "objectives.mim.mask_ratio=0"])
    assert full == flops_per_sample(con, 128)["train"] and half < full


def test_compare_ratio_is_ours_over_theirs_from_the_reported_numbers():
    row = compare({"samples_per_s": 30.0}, {"samples_per_s": 40.0, "x": 1}, peak_flops=1e9, flops=10**7)
    assert row["ratio"] == 0.75 and row["x"] == 1 and "ratio_per_cpu_s" not in row
    assert row["mfu"] == pytest.approx(10**7 * 40.0 / 1e9)
    row = compare({"samples_per_s": 30.0, "samples": 60, "process_cpu_s": 4.0},
                  {"samples_per_s": 40.0, "samples": 60, "process_cpu_s": 2.0})
    assert row["ratio_per_cpu_s"] == 0.5  # 15 vs 30 samples per CPU-second


def test_ratios_keep_four_significant_digits_at_any_magnitude():
    """A loaded machine made ours/open_clip 0.009987; 4 decimals reported 0.01 (0.13% off)."""
    row = compare({"samples_per_s": 1.0, "samples": 10, "process_cpu_s": 100.13},
                  {"samples_per_s": 100.13, "samples": 10, "process_cpu_s": 1.0})
    assert row["ratio"] == 0.009987 and row["ratio_per_cpu_s"] == 0.009987
    assert compare({"samples_per_s": 123456.0}, {"samples_per_s": 1.0})["ratio"] == 123500.0


def test_missing_open_clip_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    with pytest.raises(OpenClipUnavailable, match=r"open_clip_torch.*not importable.*pip install"):
        import_open_clip()
    cfg = load_config(None, TINY)
    with pytest.raises(OpenClipUnavailable):
        build_open_clip(cfg, 128)
    # the CLI fails before building our model or DeepSpeed, exit status 2, message on stderr
    assert main(["bench", "step", "--vs", "open_clip", "--steps", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pretrain: error:" in err and "open_clip_torch" in err and "dev extra" in err


CONTRASTIVE_FULL = ["objectives.mim.weight=0", "objectives.mlm.weight=0", "objectives.mim.mask_ratio=0"]


def test_like_for_like_changes_give_our_step_open_clips_work():
    from pretrain.bench.vs_open_clip import like_for_like_changes, unlike_reason

    default = load_config(None, TINY)  # contrastive + MAE (separate views, 50%) + MLM
    assert like_for_like_changes(default, 0.0) == {"objectives.mim.weight": 0.0, "objectives.mlm.weight": 0.0,
                                                   "objectives.mim.mask_ratio": 0.0}
    assert like_for_like_changes(default, 0.5) == {"objectives.mim.weight": 0.0, "objectives.mlm.weight": 0.0}
    assert "MAE decoder" in unlike_reason(default, 0.0) and "MLM head" in unlike_reason(default, 0.0)
    clip = load_config(None, [*TINY, *CONTRASTIVE_FULL])
    assert like_for_like_changes(clip, 0.0) == {}
    assert like_for_like_changes(clip, 0.5) == {"objectives.mim.mask_ratio": 0.5}
    assert unlike_reason(clip, 0.5) == "our contrastive pass sees 100% of the patches, open_clip's 50%"


def _fake_side(sps: float) -> dict:
    return {"samples_per_s": sps, "samples": 8, "wall_s": 8 / sps, "process_cpu_s": 8 / sps,
            "time_s": {"data": 0.0, "forward": 0.1, "backward": 0.1, "optimizer": 0.0}, "parameters": 10}


def _vs_rows(monkeypatch, overrides, patch_dropout=0.0):
    """`_vs_open_clip` with open_clip and our like-for-like rerun replaced by fixed numbers: ours as
    configured 20 samples/s, ours with open_clip's work 80, open_clip 100."""
    from pretrain.bench import step, vs_open_clip

    def fake_open_clip(cfg, vocab, batches, device, steps, warmup, patch_dropout=0.0):
        return {**_fake_side(100.0), "library": "open_clip_torch x", "patch_dropout": patch_dropout,
                "precision_mode": "fp32", "loss": "ClipLoss"}
    monkeypatch.setattr(vs_open_clip, "run_open_clip", fake_open_clip)
    reruns = []

    def run_ours(c):
        reruns.append(c)
        return _fake_side(80.0)
    cfg = load_config(None, [*TINY, *overrides])
    row = step._vs_open_clip(cfg, 10, _fake_side(20.0), 128, 100, torch.device("cpu"), 1, 0, 1e9,
                             patch_dropout, run_ours)
    return row, reruns


def test_vs_open_clip_leads_with_the_like_for_like_ratio(monkeypatch, capsys):
    """The default recipe runs MAE + MLM; open_clip contrastive only: `ratio` compared different work."""
    from pretrain.bench import step

    row, reruns = _vs_rows(monkeypatch, [])
    assert row["ratio"] == 0.2 and row["like_for_like"] is False  # the configured run, labelled
    assert row["like_for_like_ratio"] == 0.8 and row["like_for_like_ratio_per_cpu_s"] == 0.8
    assert "MAE decoder" in row["not_like_for_like"] and "MLM head" in row["not_like_for_like"]
    (fair,) = reruns  # timed again with open_clip's work
    assert fair.objectives.mim.weight == fair.objectives.mlm.weight == fair.objectives.mim.mask_ratio == 0
    assert row["ours_like_for_like"]["overrides"] == [
        "objectives.mim.weight=0.0", "objectives.mlm.weight=0.0", "objectives.mim.mask_ratio=0.0"]
    res = {"samples_per_s": 20.0, "device": "cpu", "precision": "fp32", "micro_batch": 4, "steps": 1,
           "data_source": "synthetic", "time_s": {"forward": 0.1}, "wall_s": 0.4,
           "memory": {"peak_bytes": 2**20, "how": "x"}, "flops_per_sample": 1e9, "achieved_flops_per_s": 1e9,
           "mfu": 0.1, "peak_flops_per_s": 1e10, "peak_source": "x", "parameters": 12,
           "vs_open_clip": {**row, "ours_shared_parameters": 10}}
    monkeypatch.setattr(step, "run_bench", lambda *a, **k: res)
    assert main(["bench", "step", "--vs", "open_clip", *TINY]) == 0
    out = capsys.readouterr().out
    fair_line = out.index("like-for-like ours / open_clip = 0.800x")
    assert fair_line < out.index("configured run / open_clip = 0.200x, NOT like-for-like: ours also trains")


def test_vs_open_clip_reruns_ours_only_where_the_work_differs(monkeypatch):
    row, reruns = _vs_rows(monkeypatch, CONTRASTIVE_FULL, patch_dropout=0.5)
    assert row["like_for_like"] is True and row["ratio"] == 0.2 and "like_for_like_ratio" not in row
    pd = row["patch_dropout_run"]  # ours on every patch vs open_clip's patch_dropout 0.5: rerun at 50%
    assert pd["like_for_like"] is False and pd["like_for_like_ratio"] == 0.8
    assert [c.objectives.mim.mask_ratio for c in reruns] == [0.5]
