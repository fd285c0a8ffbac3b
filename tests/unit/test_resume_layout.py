"""Which resumes go through the universal format, and which are refused: DeepSpeed loads its checkpoints
only at the layout that wrote them (ZeRO-0's at any DP size: each TP rank's file holds its whole optimizer);
the universal format reads and loads ZeRO 1-3; a ZeRO-0 checkpoint at another TP degree, or any change into
or out of ZeRO-0, is refused naming the settings that work. The runs themselves:
tests/e2e/test_resume_any_layout.py."""

from __future__ import annotations

import json

import pytest

from pretrain.checkpoint.resume import Layout, _is_copy_of, needs_universal
from pretrain.config import ConfigError


# (dp, tp, zero_stage) saved and now
@pytest.mark.parametrize("saved, now", [((2, 1, 3), (2, 1, 3)), ((1, 2, 2), (1, 2, 2)),
                                        ((4, 1, 0), (4, 1, 0)), ((2, 1, 0), (1, 1, 0)),
                                        ((1, 2, 0), (3, 2, 0))])
def test_deepspeed_loads_its_own_layout_and_zero0_at_any_dp(saved, now):
    assert not needs_universal(Layout(*saved), Layout(*now), "latest")


@pytest.mark.parametrize("saved, now", [((2, 1, 3), (1, 1, 3)), ((1, 1, 3), (1, 2, 3)),
                                        ((2, 1, 1), (1, 1, 1)), ((1, 2, 2), (2, 1, 2)),
                                        ((2, 1, 2), (2, 1, 3)), ((2, 1, 2), (1, 1, 1))])
def test_zero_1_to_3_changes_go_through_universal(saved, now):
    assert needs_universal(Layout(*saved), Layout(*now), "latest")


def test_zero0_at_another_tp_is_refused_naming_what_works():
    with pytest.raises(ConfigError) as e:
        needs_universal(Layout(2, 1, 0), Layout(1, 2, 0), "runs/x")
    msg = str(e.value)
    assert msg.startswith("--resume runs/x: saved at dp=2 tp=1 with parallel.zero_stage=0, resumed at "
                          "dp=1 tp=2")
    assert "Resume with parallel.zero_stage=0 parallel.tp=1 on any number of ranks (e.g. 2 ranks" in msg
    with pytest.raises(ConfigError, match=r"parallel.tp=2 on any multiple of 2 ranks \(e.g. 4 ranks"):
        needs_universal(Layout(2, 2, 0), Layout(2, 2, 3), "latest")  # ZeRO-0 -> 3: no optimizer to read


def test_a_zero0_run_cannot_load_another_layout():
    with pytest.raises(ConfigError, match=r"zero_stage=0: .* Resume with parallel.zero_stage=2 \(any lay"):
        needs_universal(Layout(2, 1, 2), Layout(1, 1, 0), "latest")


def test_universal_copy_is_reused_only_for_the_same_checkpoint(tmp_path):
    """A tag saved again (a resume from an older checkpoint re-saves later steps) is another checkpoint:
    its marker's sha256 differs from the one the old copy recorded."""
    copy = tmp_path / "universal" / "global_step10"
    assert not _is_copy_of(copy, "abc")
    copy.mkdir(parents=True)
    (copy / "universal.json").write_text(json.dumps({"format": "mmpt-universal", "source_sha256": "abc"}))
    assert _is_copy_of(copy, "abc") and not _is_copy_of(copy, "def")
    (copy / "universal.json").write_text(json.dumps({"format": "mmpt-universal"}))  # written before sha256s
    assert _is_copy_of(copy, "def")


@pytest.mark.parametrize("source, model, adds", [
    ({}, {"fusion.layers": 2}, True),  # the towers plus a fusion encoder
    ({}, {"fusion.layers": 2, "fusion.width": 16, "fusion.image_positions": True}, True),
    ({}, {}, False),  # the same model: an ordinary --init-from
    ({}, {"fusion.layers": 2, "text.width": 24}, False),  # other towers
    ({"fusion.layers": 1}, {"fusion.layers": 2}, False),  # a fusion model into another fusion model
    ({"fusion.layers": 1}, {}, False),  # dropping the fusion encoder
])
def test_init_from_may_add_a_fusion_encoder_to_the_same_towers_only(source, model, adds):
    """`--init-from` a dual encoder into the same towers plus a fusion encoder (the fusion part starts fresh);
    any other difference in model.* stays refused (resolve_start)."""
    from pretrain.checkpoint.resume import adds_fusion
    from pretrain.config import load_config
    from pretrain.config.loading import embedded_config_path

    def cfg(over):
        overrides = [f"model.{k}={str(v).lower()}" for k, v in over.items()]
        return load_config(embedded_config_path(), overrides).model

    assert adds_fusion(cfg(source), cfg(model)) is adds


def test_readme_fusion_stage_command_is_a_valid_config_that_adds_fusion_to_the_default_towers():
    """README's "fusion stage on pretrained towers" command, as written (its key=value words): it passes
    validation and is the default dual encoder plus a fusion encoder: `--init-from` a default run takes it."""
    import re
    import shlex
    from pathlib import Path

    from pretrain.checkpoint.resume import adds_fusion
    from pretrain.config import load_config
    from pretrain.config.loading import embedded_config_path
    from pretrain.config.validation import validate

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"pretrain train --init-from runs/clip (.*?)\n  ```", readme, re.S)
    assert block, "README lost the fusion-stage command"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    words = [w for w in words if "=" in w and w != "data.train=..."]
    cfg = load_config(embedded_config_path(), [*words, "data.train=x.tar"])
    validate(cfg)
    assert adds_fusion(load_config(embedded_config_path(), ["data.train=x.tar"]).model, cfg.model)
