"""The fusion encoder trains under the real launcher with ZeRO-3, and its weights travel through checkpoints.
One 2-rank ZeRO-3 fusion stage (`fusion_run`: ITM, negatives drawn across both ranks, and the
image-conditioned MLM) starts from `layout_straight`'s dual encoder (`--init-from`, towers frozen, bench
fusion's `frozen-towers`) and saves at steps 2 and 4; three tests read it and none writes into it:
- its start: the towers are the source's, the fusion encoder and ITM head this run's own initialisation
  (test_init_from_a_dual_encoder_adds_a_fresh_fusion_encoder[3]; [1] is the same stage at ZeRO-1);
- its step-2 DeepSpeed files resume at dp=1 x tp=2 through the universal copy (ZeRO-3 partitions -> full
  tensors -> TP slices of the fusion blocks; the frozen towers as weights only) and must log the straight
  run's losses, ITM included, with the towers still the source's (this file is also the suite's resume of
  frozen parameters at another layout: test_freeze_train.py leaves it here);
- its last checkpoint is exported to HF and open_clip.
One run for the three saves two 2-rank launches (~20 CPU s each): the resume and the export checks hold for
frozen towers as for trained ones (the towers' Adam moments across layouts: test_resume_any_layout.py).
The recipe and the helpers are tests/layouts.py's (fp32, the same global batches in every layout)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from layouts import assert_continues, only_checkpoint, tag, train

from pretrain.checkpoint.sources import build_model, open_source
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow

# block 0 at lr multiplier 0 stays at this run's own initialisation (what the init test compares it with);
# block 1, the ITM head and the positions train. The fusion width is the text width (the default, as in bench
# fusion): the conditioned MLM head then has the source's shape and is loaded from it
FUSION = ["model.fusion.layers=2", "model.fusion.heads=2", "objectives.itm.weight=1",
          "objectives.mlm.conditioned=true", "model.fusion.text_positions=true",
          "model.fusion.image_positions=true", "train.freeze=[visual.*,text.*,logit_scale]",
          "optim.lr_mult={fusion.resblocks.0.*: 0}", "train.seed=5", "checkpoint.every=2"]
TOWERS = ("visual.", "text.", "logit_scale")
STEPS, AT = 4, 2
FRESH = "the source lacks start from this run's initialisation: fusion.*, itm_head.*"


def dual_encoder(layout_straight):
    """The `--init-from` source: the session's reference dual encoder (tests/layouts.py) at step 3."""
    return layout_straight / "checkpoints" / tag(3)


@pytest.fixture(scope="module")
def fusion_run(layout_straight, layout_data, tmp_path_factory):
    """The 2-rank ZeRO-3 fusion stage (FUSION on `dual_encoder`, STEPS steps, saved at AT and STEPS) and its
    stderr: the init test checks its start, the resume test continues it at another layout, the export test
    converts it; none writes into it."""
    run = tmp_path_factory.mktemp("fusion") / "dp2"
    source = dual_encoder(layout_straight)
    r = train(run, layout_data, 2, steps=STEPS, extra=[*FUSION, "--init-from", str(source)])
    return run, r.stderr


@pytest.mark.timeout(900)
def test_fusion_run_resumes_at_another_layout_with_its_fusion_weights(fusion_run, layout_data, tmp_path):
    straight = fusion_run[0]
    rows = {r["step"]: r for r in read_metrics(straight) if "loss" in r}
    assert all(rows[s]["loss_itm"] > 0 for s in range(1, STEPS + 1))  # logged like the other objectives

    src = only_checkpoint(straight, AT, tmp_path / "dp2_step2")
    resumed = tmp_path / "tp2"
    r = train(resumed, layout_data, 2, tp=2, steps=STEPS, extra=FUSION,
              resume=str(src / "checkpoints" / tag(AT)))
    assert "from layout dp=2 tp=1 to dp=1 tp=2 (ZeRO 3 -> 3) through its universal copy" in r.stderr
    universal = src / "checkpoints" / "universal" / tag(AT)
    names = json.dumps(json.loads((universal / "universal.json").read_text()))
    for name in ("fusion.resblocks.0.cross.kv.weight", "fusion.resblocks.1.attn.qkv.weight",
                 "fusion.text_pos", "fusion.image_pos.embedding", "itm_head.fc.weight"):
        assert name in names, name
    copy = open_source(universal)
    assert copy.frozen == {n for n in copy.names if n.startswith(TOWERS)}  # weights only, no moments
    assert_continues(straight, resumed, AT, STEPS)  # every LOSS_KEYS loss and the exact samples
    got = {r["step"]: r for r in read_metrics(resumed) if "loss" in r}
    for step in range(AT + 1, STEPS + 1):
        assert got[step]["loss_itm"] == pytest.approx(rows[step]["loss_itm"], rel=1e-4), step
    want, now = open_source(straight).state_dict(), open_source(resumed).state_dict()
    for n in want:  # the frozen towers stayed locked through the layout change (TP slices at tp=2)
        if n.startswith(TOWERS):
            assert torch.equal(now[n], want[n]), n


@pytest.mark.timeout(600)
def test_hf_and_open_clip_exports_carry_the_dual_encoder_and_name_the_fusion_part_left_out(
        fusion_run, tmp_path, caplog):
    """`convert --to hf` / `--to open_clip` of a fusion run (`fusion_run`'s last checkpoint: ITM +
    conditioned MLM, 2-rank ZeRO-3): each library loads its folder with no missing or unexpected weight and
    gives our dual encoder's embeddings; the fusion encoder and its heads, which neither model has a place
    for, are named in `left_out` (the command's JSON and the manifest) and in a log line, not dropped
    silently. `--to hf` runs as the `pretrain` program (the suite's program path of `convert --to
    hf|open_clip`, which test_clip_roundtrip.py leaves here: exit code, JSON on stdout, the line on stderr);
    `--to open_clip` in this process (`pretrain.cli.main`, the same parsing and output, its line read from
    the log records): a program start costs ~3.5 CPU s of imports."""
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from tiny import cli_json, pretrain_cli

    from pretrain.evaluation.evaluate import load_model

    run = fusion_run[0]
    ours, tokenizer, cfg = load_model(run)
    torch.manual_seed(0)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size)
    captions = ["red circle left of blue square", "a green cross"]
    ids = tokenizer.encode_batch(captions, cfg.model.text.context_length)
    with torch.no_grad():
        want_img, want_txt = ours.encode_image(images), ours.encode_text(ids)
    for kind in ("hf", "open_clip"):
        if kind == "hf":
            r = pretrain_cli("convert", str(run), str(tmp_path / kind), "--to", kind)
            assert r.returncode == 0, r.stderr[-2000:]
            out, err = json.loads(r.stdout), r.stderr
        else:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="mmpt"):
                out = cli_json("convert", str(run), str(tmp_path / kind), "--to", kind)
            err = caplog.text
        for part in ("fusion", "itm_head", "mlm_head"):
            assert part in out["left_out"], (kind, out["left_out"])
        assert json.loads((tmp_path / kind / "manifest.json").read_text())["left_out"] == out["left_out"]
        assert f"--to {kind} exports the dual encoder" in err and "left out: " in err, (kind, err[-2000:])
    hf, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    oc, _ = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'open_clip'}")
    with torch.no_grad():
        hf_img = hf.eval().get_image_features(pixel_values=images)
        hf_txt = hf.get_text_features(input_ids=ids)
        got = {"hf": [getattr(hf_img, "pooler_output", hf_img), getattr(hf_txt, "pooler_output", hf_txt)],
               "open_clip": [oc.eval().encode_image(images), oc.encode_text(ids)]}
    for kind, (img, txt) in got.items():
        assert float((F.normalize(img.float(), dim=-1) - want_img).abs().max()) <= 1e-5, kind
        assert float((F.normalize(txt.float(), dim=-1) - want_txt).abs().max()) <= 1e-5, kind


@pytest.mark.timeout(600)
# ZeRO-3: the flat fp32 master's slices; ZeRO-1: fragments. [1] is also the 2-rank ZeRO-1 `--init-from`
# check (frozen towers loaded and read back bit-exact) that test_freeze_train.py and test_clip_roundtrip.py
# leave to it
@pytest.mark.parametrize("stage", [3, 1])
def test_init_from_a_dual_encoder_adds_a_fresh_fusion_encoder(layout_straight, layout_data, tmp_path, request,
                                                              stage):
    """A fusion stage on pretrained towers (bench fusion's `frozen-towers`), at 2-rank ZeRO-3 (`fusion_run`,
    4 steps) and ZeRO-1 (a 2-step run of the same recipe): `--init-from` a dual encoder into the same towers
    plus a fusion encoder loads the towers (frozen here: bit-identical to the source after training) and
    leaves the fusion encoder and ITM head at this run's own seeded initialisation, not zeros or the
    source's: a block at lr multiplier 0 equals it exactly, the others move from it. A source whose towers
    differ is still refused (one process: the refusal comes before any model or engine is built, so the
    2-rank launch added nothing to it)."""
    source = dual_encoder(layout_straight)
    if stage == 3:
        run, stderr = request.getfixturevalue("fusion_run")
    else:
        run = tmp_path / "stage2"
        stderr = train(run, layout_data, 2, steps=2,
                       extra=[*FUSION, f"parallel.zero_stage={stage}", "--init-from", str(source)]).stderr
    assert FRESH in stderr
    given, after = open_source(source).state_dict(), open_source(run).state_dict()
    cfg = open_source(run)
    assert cfg.config.parallel.zero_stage == stage
    torch.manual_seed(cfg.config.train.seed)
    own = {n: p.detach() for n, p in build_model(cfg.config, cfg.meta["tokenizer"]).named_parameters()}
    assert set(after) == set(own)  # the checkpoint reader of the stage gives every parameter, frozen ones too
    fresh = [n for n in after if n.startswith(("fusion.", "itm_head."))]
    assert len(fresh) > 20 and not any(n in given for n in fresh)
    for n in after:
        if n.startswith(TOWERS):
            assert torch.equal(after[n], given[n]), n
        elif n.startswith("fusion.resblocks.0."):
            assert torch.equal(after[n], own[n]), f"{n}: not this run's own initialisation"
        elif n in fresh:
            assert not torch.equal(after[n], own[n]), f"{n} did not train"
            assert (after[n] - own[n]).abs().max() < 0.05, f"{n}: far from its initialisation"

    if stage == 1:
        return
    bad = train(tmp_path / "other", layout_data, 1, steps=1, ok=False,
                extra=[*FUSION, "model.text.layers=2", "--init-from", str(source)])
    assert "its model config differs from this run's" in bad.stderr + bad.stdout
