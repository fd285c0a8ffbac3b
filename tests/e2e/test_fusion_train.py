"""The fusion encoder trains under the real launcher with ZeRO-3, and its weights travel through checkpoints:
a 2-rank ZeRO-3 run with ITM (negatives drawn across both ranks) and the image-conditioned MLM saves at
step 2; its DeepSpeed files resume at dp=1 x tp=2 through the universal copy (ZeRO-3 partitions ->
full tensors -> TP slices of the fusion blocks) and must log the straight run's losses, ITM included.
The recipe and the helpers are tests/layouts.py's (fp32, the same global batches in every layout)."""

from __future__ import annotations

import json

import pytest
from layouts import assert_continues, only_checkpoint, tag, train

from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow

FUSION = ["model.fusion.layers=1", "model.fusion.width=16", "model.fusion.heads=2", "objectives.itm.weight=1",
          "objectives.mlm.conditioned=true", "model.fusion.text_positions=true",
          "model.fusion.image_positions=true", "checkpoint.every=2"]
STEPS, AT = 4, 2


@pytest.mark.timeout(900)
def test_fusion_run_resumes_at_another_layout_with_its_fusion_weights(layout_data, tmp_path):
    straight = tmp_path / "dp2"
    train(straight, layout_data, 2, steps=STEPS, extra=FUSION)
    rows = {r["step"]: r for r in read_metrics(straight) if "loss" in r}
    assert all(rows[s]["loss_itm"] > 0 for s in range(1, STEPS + 1))  # logged like the other objectives

    src = only_checkpoint(straight, AT, tmp_path / "dp2_step2")
    resumed = tmp_path / "tp2"
    r = train(resumed, layout_data, 2, tp=2, steps=STEPS, extra=FUSION,
              resume=str(src / "checkpoints" / tag(AT)))
    assert "from layout dp=2 tp=1 to dp=1 tp=2 (ZeRO 3 -> 3) through its universal copy" in r.stderr
    universal = src / "checkpoints" / "universal" / tag(AT)
    names = json.dumps(json.loads((universal / "universal.json").read_text()))
    for name in ("fusion.resblocks.0.cross.kv.weight", "fusion.resblocks.0.attn.qkv.weight",
                 "fusion.text_pos", "fusion.image_pos.embedding", "itm_head.fc.weight"):
        assert name in names, name
    assert_continues(straight, resumed, AT, STEPS)  # every LOSS_KEYS loss and the exact samples
    got = {r["step"]: r for r in read_metrics(resumed) if "loss" in r}
    for step in range(AT + 1, STEPS + 1):
        assert got[step]["loss_itm"] == pytest.approx(rows[step]["loss_itm"], rel=1e-4), step
