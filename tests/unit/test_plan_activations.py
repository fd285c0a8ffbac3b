"""`pretrain plan`'s activation estimate against what autograd actually saves for backward, per forward the
training loop runs: separate views (`objectives.mim.shared_pass: false`, the shipped default: a full-image
contrastive pass next to MAE's masked one), the shared FLIP + MAE pass, the unmasked tail
(`objectives.mim.unmasked_tail_steps`), and `train.task=classify` (the ClassifierModel fine-tuning builds).

Measured: the bytes of every tensor autograd keeps for backward in one training forward (saved-tensor hooks,
deduplicated by storage, parameters excluded), divided by the micro-batch. Deterministic, unlike RSS peaks
(tests/e2e/test_plan_memory.py checks those, more loosely). The plan may differ by TOLERANCE either way:
it counts a few small tensors (LayerNorm statistics, masks) by formula, not exactly.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import embedded_config_path, load_config
from pretrain.models.classifier import ClassifierModel
from pretrain.models.pretrain_model import PretrainModel
from pretrain.plan.memory import memory_plan, plan_vocab_size

TOLERANCE = 0.15
"""Planned per-sample bytes / measured must be within 1 +- this (1.08-1.11 on the cases below, 2026-12)."""
B = 2
# the demo recipe (configs/demo.yaml: separate views, 50% masking, MLM on) in fp32, two blocks per tower
BASE = ["train.precision=fp32", "model.vision.layers=2", "model.text.layers=2", "model.decoder.layers=1"]


def saved_bytes_per_sample(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Bytes of the distinct storages autograd saves for backward in one forward of `model`, parameters
    (and views of them) excluded, per sample."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    assert out["loss"].requires_grad
    return sum(seen.values()) / B


def pretrain_batch(cfg) -> dict[str, torch.Tensor]:
    m = cfg.model
    n, length = (m.image_size // m.vision.patch_size) ** 2, m.text.context_length
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, 200, (B, length), generator=g)
    return {"image": torch.randn(B, 3, m.image_size, m.image_size, generator=g), "text": text,
            "patch_noise": torch.rand(B, n, generator=g), "mlm_input": text.clone(),
            "mlm_labels": text.clone()}


def planned(cfg) -> tuple[int, str]:
    a = memory_plan(cfg, world=1)["activations"]
    return a["per_sample_bytes"]["no_checkpointing"], a.get("phase", {}).get("no_checkpointing", "masked")


@pytest.mark.parametrize("overrides, phase", [
    ([], "masked"),  # the default: separate views, a full-image contrastive pass + MAE's masked pass
    (["objectives.mim.shared_pass=true"], "masked"),  # FLIP + MAE: one masked pass feeds both
    # the tail's full-image pass outweighs the 75%-masked phase
    (["objectives.mim.shared_pass=true", "objectives.mim.mask_ratio=0.75",
      "objectives.mim.unmasked_tail_steps=1"], "unmasked_tail"),
    (["objectives.mim.unmasked_tail_steps=1"], "masked"),  # separate views: the masked phase is larger
], ids=["separate_views", "shared_pass", "tail_larger", "tail_smaller"])
def test_planned_activations_match_saved_tensors(overrides, phase):
    cfg = load_config(embedded_config_path(), [*BASE, *overrides])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, vocab_size=plan_vocab_size(cfg)).train()
    batch = pretrain_batch(cfg)
    measured = {"masked": saved_bytes_per_sample(model, batch)}
    if cfg.objectives.mim.unmasked_tail_steps > 0:  # the plan reports the larger of the two forwards
        model.set_unmasked_tail(True)
        measured["unmasked_tail"] = saved_bytes_per_sample(model, batch)
    plan, plan_phase = planned(cfg)
    largest = max(measured, key=measured.get)
    ratio = plan / measured[largest]
    print(f"{overrides}: measured {measured}, planned {plan} ({plan_phase}), ratio {ratio:.3f}")
    assert (plan_phase, largest) == (phase, phase)
    assert abs(ratio - 1) <= TOLERANCE, (plan, measured)


def classify_config(tmp_path, extra: tuple[str, ...] = ()):
    names = tmp_path / "classnames.txt"
    names.write_text("".join(f"class {i}\n" for i in range(10)))
    return load_config(embedded_config_path(), [*BASE, "train.task=classify", f"finetune.classnames={names}",
                                                *extra])


def test_classify_plans_the_classifier_fine_tuning_builds(tmp_path):
    cfg = classify_config(tmp_path)
    plan = memory_plan(cfg, world=2)
    torch.manual_seed(0)
    model = ClassifierModel.from_config(cfg, 10).train()
    assert plan["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert plan["task"] == "classify" and plan["num_classes"] == 10 and "vocab_padded" not in plan
    a = plan["activations"]
    assert set(a["per_sample_parts"]["no_checkpointing"]) == {"inputs", "vision_encoder_full"}
    assert a["contrastive"]["bytes_at_micro_batch"] == 0
    m = cfg.model
    batch = {"image": torch.randn(B, 3, m.image_size, m.image_size), "cls": torch.tensor([1, 7])}
    ratio = a["per_sample_bytes"]["no_checkpointing"] / saved_bytes_per_sample(model, batch)
    print(f"classify: ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, ratio


def test_classify_comm_has_no_contrastive_gather(tmp_path):
    from pretrain.plan.comm import comm_plan

    cfg = classify_config(tmp_path, ("parallel.tp=2",))
    plan = memory_plan(cfg, world=4)
    rows = comm_plan(cfg, plan["params"], world=4)["per_rank_bytes"]
    assert "contrastive_feature_gather" not in rows and rows["tp_activation_allreduce"] > 0
