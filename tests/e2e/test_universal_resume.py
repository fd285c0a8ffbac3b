"""A run's state survives a change of layout: 20 steps straight at (dp=2, tp=1) versus 10 steps there ->
universal checkpoint -> 10 more at (dp=1, tp=2) and at (dp=4, tp=1), under the real deepspeed launcher.

The same again at the default `parallel.persistence_threshold`, where ZeRO-3 keeps these small parameters
whole on every rank (the other cases partition everything): written, converted and loaded under both.

Steps 11-20 must log the same losses (fp32, 1e-4 relative) and train on exactly the same samples: the
global batches are the same in every layout (tests/layouts.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import SMALL as LAYOUT_SMALL
from layouts import keys_by_step, losses, write_layout_data
from tiny import DEFAULT_PERSISTENCE, ROOT, persistent_params, pretrain_cli, run_pretrain

pytestmark = pytest.mark.slow
STEPS, HALF = 20, 10
SMALL = [*LAYOUT_SMALL, f"train.steps={STEPS}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return write_layout_data(tmp_path_factory.mktemp("uni_data"), STEPS)


def _train(run_dir: Path, procs: int, extra: list[str], data: list[str], resume: str | None = None) -> None:
    args = ["train", f"run.dir={run_dir}", *SMALL, *data, *extra] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=procs, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _convert(checkpoint: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "convert", str(checkpoint), str(out), "--to",
                        "universal"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _layout_runs(base: Path, data: list[str], extra: list[str]) -> dict[str, Path]:
    """Straight (dp=2) run -> universal conversion of step 10 -> resumed under (tp=2) and (dp=4).

    The straight run also saves at step 10 in both formats (checkpoint.universal)."""
    straight = base / "straight"
    _train(straight, 2, ["train.micro_batch=8", "checkpoint.every=10", "checkpoint.universal=true", *extra],
           data)
    uni = base / "universal10"
    _convert(straight / "checkpoints" / "global_step10", uni)
    out = {"straight": straight, "universal": uni}
    for name, procs, layout in [("tp2", 2, ["parallel.tp=2", "train.micro_batch=16"]),
                                ("dp4", 4, ["train.micro_batch=4"])]:
        # no data.tokenizer: the resumed run must take the checkpoint's own tokenizer
        _train(base / name, procs, [*layout, *extra], data[:1], resume=str(uni))
        assert (base / name / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    return _layout_runs(tmp_path_factory.mktemp("uni_runs"), data, [])


@pytest.fixture(scope="module")
def runs_default(data, tmp_path_factory) -> dict[str, Path]:
    """Every run at the default persistence threshold (all of SMALL's parameters stay whole)."""
    out = _layout_runs(tmp_path_factory.mktemp("uni_runs_default"), data, [DEFAULT_PERSISTENCE])
    assert persistent_params(out["straight"]) > 0
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("persistence", ["threshold0", "default_threshold"])
@pytest.mark.parametrize("layout", ["tp2", "dp4"])
def test_resume_under_new_layout_matches_straight_run(request, layout, persistence):
    runs = request.getfixturevalue("runs" if persistence == "threshold0" else "runs_default")
    ref, got = losses(runs["straight"]), losses(runs[layout])
    assert sorted(got) == list(range(HALF + 1, STEPS + 1)), "the resumed run must log steps 11..20"
    for step in range(HALF + 1, STEPS + 1):
        for k, v in ref[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4), (layout, step, k, got[step][k], v)
    keys_ref, keys_got = keys_by_step(runs["straight"]), keys_by_step(runs[layout])
    for step in range(HALF + 1, STEPS + 1):
        assert keys_got[step] == keys_ref[step], f"{layout}: step {step} trained on different samples"


@pytest.mark.timeout(1200)
def test_direct_universal_save_equals_conversion(runs):
    from pretrain.checkpoint.sources import open_source

    direct = open_source(runs["straight"] / "checkpoints" / "universal" / "global_step10")
    converted = open_source(runs["universal"])
    assert direct.names == converted.names
    for name in direct.names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(direct.tensor(name, key), converted.tensor(name, key)), (name, key)
    meta = json.loads((runs["universal"] / "universal.json").read_text())
    assert meta["step"] == HALF and meta["dp_world"] == 2 and meta["tp"] == 1
    assert any(e["tp_split_dim"] == 0 for e in meta["params"].values())  # column-parallel weights
    assert any(e["tp_split_dim"] == 1 for e in meta["params"].values())  # row-parallel weights


@pytest.mark.timeout(1200)
def test_default_threshold_trains_and_converts_to_the_same_state(runs, runs_default):
    """Persistent parameters change where ZeRO-3 keeps them, not the math or what a checkpoint holds."""
    from pretrain.checkpoint.sources import open_source

    ref, got = losses(runs["straight"]), losses(runs_default["straight"])
    assert sorted(got) == sorted(ref)
    for step, values in ref.items():
        for k, v in values.items():
            assert got[step][k] == pytest.approx(v, rel=1e-5), (step, k, got[step][k], v)
    ref = open_source(runs["universal"])
    direct = runs_default["straight"] / "checkpoints" / "universal" / "global_step10"
    for src in (open_source(runs_default["universal"]), open_source(direct)):  # converted, saved directly
        assert src.names == ref.names
        for name in ref.names:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(src.tensor(name, key), ref.tensor(name, key), rtol=1e-5, atol=1e-7,
                                           msg=f"{src.path}: {name} {key}")


@pytest.mark.timeout(1200)
def test_deepspeed_zero_to_fp32_equals_our_safetensors_export(runs, tmp_path):
    from safetensors.torch import load_file

    root = runs["straight"] / "checkpoints"
    ds_out = tmp_path / "zero_to_fp32"
    r = subprocess.run([sys.executable, str(root / "zero_to_fp32.py"), str(root), str(ds_out), "-t",
                        "global_step10", "--safe_serialization"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = pretrain_cli("convert", str(root / "global_step10"), str(tmp_path / "ours"), "--to", "safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(ds_out / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) > 20
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    # eval/embed read every kind: DeepSpeed, universal and the export give the same model
    from pretrain.evaluation.evaluate import load_model

    kinds = (root / "global_step10", runs["universal"], tmp_path / "ours")
    models = [load_model(p)[0].state_dict() for p in kinds]
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]) and torch.equal(models[0][k], models[2][k]), k
    r = pretrain_cli("convert", str(root / "global_step10"), str(tmp_path / "bf16"), "--to", "safetensors",
             "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))[k].dtype == torch.bfloat16


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(1200)
def test_corrupt_checkpoint_file_is_refused_naming_it(runs, data, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    copy.mkdir()
    shutil.copytree(runs["straight"] / "checkpoints" / "global_step20", copy / "global_step20")
    (copy / "latest").write_text("global_step20")
    bad = copy / "global_step20" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip_byte(bad)
    r = pretrain_cli("convert", str(copy), str(tmp_path / "out"), "--to", "universal")
    assert r.returncode == 2 and bad.name in r.stderr and "corrupt" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    r = run_pretrain(["train", f"run.dir={tmp_path / 'resumed'}", *SMALL, *data, "train.micro_batch=16",
                      "train.steps=22", "--resume", str(copy)], timeout=300)
    assert r.returncode != 0 and bad.name in r.stderr + r.stdout and "corrupt" in r.stderr + r.stdout

    uni = tmp_path / "uni"
    shutil.copytree(runs["universal"], uni)
    _flip_byte(uni / "exp_avg.safetensors")
    r = run_pretrain(["train", f"run.dir={tmp_path / 'resumed2'}", *SMALL, *data, "train.micro_batch=16",
                      "--resume", str(uni)], timeout=300)
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "exp_avg.safetensors: sha256 does not match" in out, out[-2000:]


@pytest.mark.timeout(1200)
def test_trained_checkpoint_exports_load_in_hf_and_open_clip_with_our_embeddings(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from pretrain.evaluation.evaluate import load_model

    model, tok, cfg = load_model(runs["straight"])
    texts = ["a red square", "two blue circles on green", "a photo"]
    ids = tok.encode_batch(texts, cfg.model.text.context_length)
    size = cfg.model.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(ids)

    for to in ("hf", "open_clip"):
        r = pretrain_cli("convert", str(runs["straight"]), str(tmp_path / to), "--to", to)
        assert r.returncode == 0, r.stderr[-2000:]
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
