"""A run's state survives a change of layout through a universal checkpoint that `pretrain convert` writes or
`checkpoint.universal=true` saves with each checkpoint; the same checkpoints export to safetensors, Hugging
Face and open_clip with the same weights.

At the default `parallel.persistence_threshold` ZeRO-3 keeps these small parameters whole on every rank (the
reference run of tests/layouts.py partitions everything): a straight (dp=2) run there logs the reference
run's losses and saves its state, directly and through `pretrain convert`; that step-6 copy, named to
`--resume`, continues at (dp=4, tp=1), its persistent parameters loaded on 4 DP ranks, with the straight
run's losses (fp32, 1e-4 relative) on exactly its samples. The automatic resumes at (dp=1), (dp=2) and (tp=2)
with every parameter partitioned are in test_resume_any_layout.py.

Conversions whose success is what is checked call `pretrain convert`'s function (`checkpoint.convert.convert`)
in this process instead of a `pretrain convert` process each (the command's own exit codes and messages:
the corrupt-file test here, and the CLI conversions of tests/e2e/test_fusion_train.py and
test_clip_roundtrip.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import EVERY, STEPS, assert_continues, losses, tag, train
from tiny import DEFAULT_PERSISTENCE, persistent_params, pretrain_cli

pytestmark = pytest.mark.slow
CONVERTED = 2 * EVERY  # the step whose checkpoint `pretrain convert` turns universal here


def convert(src: Path, dst: Path, to: str, dtype: str = "fp32") -> None:
    """What `pretrain convert SRC DST --to TO --dtype DTYPE` does, in this process (see the docstring)."""
    from pretrain.checkpoint.convert import convert as run

    run(src, dst, to, dtype)


@pytest.fixture(scope="module")
def default_runs(layout_data, tmp_path_factory) -> dict[str, Path]:
    """At the default persistence threshold: the straight run, its step-6 checkpoint converted by `pretrain
    convert`, and the run resumed from that at (dp=4)."""
    base = tmp_path_factory.mktemp("uni_default")
    straight, uni, dp4 = base / "straight", base / "universal6", base / "dp4"
    # saves at step 6 (the one read here) and the last step only
    train(straight, layout_data, 2,
          extra=[f"checkpoint.every={CONVERTED}", "checkpoint.universal=true", DEFAULT_PERSISTENCE])
    assert persistent_params(straight) > 0
    convert(straight / "checkpoints" / tag(CONVERTED), uni, "universal")
    # no data.tokenizer: the resumed run must take the checkpoint's own
    r = train(dp4, layout_data[:1], 4, extra=[DEFAULT_PERSISTENCE], resume=str(uni))
    assert (dp4 / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
    return {"straight": straight, "universal": uni, "dp4": dp4, "dp4_log": r.stderr}


@pytest.mark.timeout(1200)
def test_universal_checkpoint_resumes_under_new_layout_like_the_straight_run(default_runs):
    assert_continues(default_runs["straight"], default_runs["dp4"], CONVERTED, STEPS)
    assert persistent_params(default_runs["dp4"]) > 0
    log = default_runs["dp4_log"]
    assert f"resumed from {default_runs['universal']} at step {CONVERTED}" in log, log[-3000:]


@pytest.mark.timeout(1200)
def test_direct_universal_save_equals_conversion(default_runs):
    from pretrain.checkpoint.sources import open_source

    direct = open_source(default_runs["straight"] / "checkpoints" / "universal" / tag(CONVERTED))
    converted = open_source(default_runs["universal"])
    assert direct.names == converted.names
    for name in direct.names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(direct.tensor(name, key), converted.tensor(name, key)), (name, key)
    meta = json.loads((default_runs["universal"] / "universal.json").read_text())
    assert meta["step"] == CONVERTED and meta["dp_world"] == 2 and meta["tp"] == 1
    assert any(e["tp_split_dim"] == 0 for e in meta["params"].values())  # column-parallel weights
    assert any(e["tp_split_dim"] == 1 for e in meta["params"].values())  # row-parallel weights


@pytest.mark.timeout(1200)
def test_default_threshold_trains_and_converts_to_the_same_state(layout_straight, default_runs):
    """Persistent parameters change where ZeRO-3 keeps them, not the math or what a checkpoint holds."""
    from pretrain.checkpoint.sources import open_source

    ref, got = losses(layout_straight), losses(default_runs["straight"])
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step, values in ref.items():
        for k, v in values.items():
            assert got[step][k] == pytest.approx(v, rel=1e-5), (step, k, got[step][k], v)
    ref = open_source(layout_straight / "checkpoints" / "universal" / tag(CONVERTED))
    direct = default_runs["straight"] / "checkpoints" / "universal" / tag(CONVERTED)
    for src in (open_source(default_runs["universal"]), open_source(direct)):  # converted, saved directly
        assert src.names == ref.names
        for name in ref.names:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(src.tensor(name, key), ref.tensor(name, key), rtol=1e-5, atol=1e-7,
                                           msg=f"{src.path}: {name} {key}")


@pytest.mark.timeout(1200)
def test_deepspeed_zero_to_fp32_equals_our_safetensors_export(layout_straight, tmp_path):
    from safetensors.torch import load_file

    root = layout_straight / "checkpoints"
    ds_out = tmp_path / "zero_to_fp32"
    r = subprocess.run([sys.executable, str(root / "zero_to_fp32.py"), str(root), str(ds_out), "-t",
                        tag(EVERY), "--safe_serialization"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    convert(root / tag(EVERY), tmp_path / "ours", "safetensors")
    theirs = load_file(str(ds_out / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) > 20
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    # eval/embed read every kind: DeepSpeed, universal and the export give the same model
    from pretrain.evaluation.evaluate import load_model

    kinds = (root / tag(EVERY), root / "universal" / tag(EVERY), tmp_path / "ours")
    models = [load_model(p)[0].state_dict() for p in kinds]
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]) and torch.equal(models[0][k], models[2][k]), k
    convert(root / tag(EVERY), tmp_path / "bf16", "safetensors", "bf16")
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))[k].dtype == torch.bfloat16


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(1200)
def test_corrupt_checkpoint_file_is_refused_naming_it(layout_straight, layout_data, tmp_path):
    copy = tmp_path / "ckpt"
    copy.mkdir()
    shutil.copytree(layout_straight / "checkpoints" / tag(STEPS), copy / tag(STEPS))
    (copy / "latest").write_text(tag(STEPS))
    bad = copy / tag(STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip_byte(bad)
    r = pretrain_cli("convert", str(copy), str(tmp_path / "out"), "--to", "universal")
    assert r.returncode == 2 and bad.name in r.stderr and "corrupt" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    r = train(tmp_path / "resumed", layout_data, 1, steps=STEPS + 2, resume=str(copy), ok=False)
    assert bad.name in r.stderr + r.stdout and "corrupt" in r.stderr + r.stdout

    uni = tmp_path / "uni"
    shutil.copytree(layout_straight / "checkpoints" / "universal" / tag(EVERY), uni)
    _flip_byte(uni / "exp_avg.safetensors")
    r = train(tmp_path / "resumed2", layout_data, 1, resume=str(uni), ok=False)
    out = r.stderr + r.stdout
    assert "exp_avg.safetensors: sha256 does not match" in out, out[-2000:]


@pytest.mark.timeout(1200)
def test_trained_checkpoint_exports_load_in_hf_and_open_clip_with_our_embeddings(layout_straight, tmp_path):
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from pretrain.evaluation.evaluate import load_model

    model, tok, cfg = load_model(layout_straight)
    texts = ["a red square", "two blue circles on green", "a photo"]
    ids = tok.encode_batch(texts, cfg.model.text.context_length)
    size = cfg.model.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(ids)

    for to in ("hf", "open_clip"):
        convert(layout_straight, tmp_path / to, to)
        assert json.loads((tmp_path / to / "manifest.json").read_text())["kind"] == to
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'open_clip'}").eval()
    with torch.no_grad():
        got = {"hf": (hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=ids)),
               "open_clip": (oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True))}
    for name, (img, txt) in got.items():
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        assert (img - ref_img).abs().max() < 1e-4, name
        assert (txt - ref_txt).abs().max() < 1e-4, name
