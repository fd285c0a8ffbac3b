"""LAION's real `clip_benchmark eval` CLI (PyPI clip-benchmark 1.6.2) scores our `convert --to open_clip`
export on a CLIP_benchmark-layout set written by `pretrain data clip-benchmark`, and its zero-shot
accuracy equals `pretrain eval` on the same checkpoint, set and templates file.

The data are scikit-learn's digit scans (real images, offline); a tiny contrastive-only model trains for
80 steps, enough to sit above chance so equal accuracies are not two constant predictions. clip_benchmark
runs from the overlay venv of `pretrain.bench.quality_openclip` (`make test` builds it), offline
(`local-dir:` model, HF offline), in fp32 (`--no_amp`: on CPU its default autocast is bf16). Besides top-1
and top-5 (counts of 360 samples, compared exactly), the class embeddings it saves (`--save_clf`) must
match ours, and its mean per-class recall must equal the one of our own predictions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ROOT, TINY, run_pretrain

from data_pipelines.loader import make_eval_loader
from pretrain.cli import main
from pretrain.evaluation.evaluate import classifier_weights, load_model
from pretrain.evaluation.layout import resolve_eval_data

pytestmark = pytest.mark.slow

PYTHON = Path(os.environ.get("MMPT_OPEN_CLIP_PYTHON") or ROOT / ".venv-openclip" / "bin" / "python")
CLI = PYTHON.parent / "clip_benchmark"
PROMPTS = "a handwritten {c}\nthe number {c} written by hand\na scanned handwritten digit {c}\n"
"""Prompts in the digits' caption style, stored as the set's zeroshot_classification_templates.txt."""


def _clip_benchmark_missing() -> str:
    if not CLI.exists():
        return (f"no clip_benchmark CLI at {CLI}: build the overlay venv with "
                "`python -m pretrain.bench.quality_openclip .venv-openclip` (`make test` does)")
    r = subprocess.run([str(PYTHON), "-c", "import clip_benchmark.cli"], capture_output=True, text=True)
    return f"clip_benchmark does not import in {PYTHON}: {r.stderr[-300:]}" if r.returncode else ""


@pytest.mark.skipif(bool(_clip_benchmark_missing()), reason=_clip_benchmark_missing() or "ok")
def test_clip_benchmark_cli_agrees_with_pretrain_eval(tmp_path, capsys):
    from data_pipelines.digits import write_digits

    digits = write_digits(tmp_path / "digits", image_size=32, per_shard=200)
    run = tmp_path / "run"
    r = run_pretrain(["train", *TINY, f"data.train={digits['train']}", f"run.dir={run}", "train.steps=80",
                      "data.workers=0", "optim.lr=1e-3", "optim.warmup_steps=5", "train.micro_batch=32",
                      "objectives.mim.weight=0", "objectives.mlm.weight=0", "logging.every=20",
                      "logging.tensorboard=false"], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["convert", str(run), str(tmp_path / "oc"), "--to", "open_clip"]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cb = tmp_path / "cb"
    assert main(["data", "clip-benchmark", digits["val"], str(cb), "--templates", str(prompts)]) == 0
    capsys.readouterr()

    # ours: the folder alone (classnames.txt and the templates file found in it)
    assert main(["eval", "--checkpoint", str(run), "--data", str(cb), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    out = tmp_path / "clip_benchmark.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([str(CLI), "eval", "--dataset", "wds/digits", "--dataset_root", str(cb),
                        "--task", "zeroshot_classification", "--model", f"local-dir:{tmp_path / 'oc'}",
                        "--pretrained", "none", "--model_type", "open_clip", "--no_amp", "--num_workers", "0",
                        "--batch_size", "64", "--save_clf", str(tmp_path / "clf.pt"), "--output", str(out),
                        "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    theirs = json.loads(out.read_text())["metrics"]

    n = ours["samples"]
    assert n == digits["val_samples"] == 360
    assert ours["zeroshot_top1"] > 0.12, ours  # above the 0.1 chance: the comparison is not vacuous
    assert round(theirs["acc1"] * n) == round(ours["zeroshot_top1"] * n), (theirs, ours)
    assert round(theirs["acc5"] * n) == round(ours["zeroshot_top5"] * n), (theirs, ours)

    # the same class embeddings from the same prompts ([E, C] in clip_benchmark)
    model, tok, cfg = load_model(run)
    ds = resolve_eval_data(str(cb))
    names = ds.classnames.read_text().split()
    mine = classifier_weights(model, tok, names, cfg.model.text.context_length, tuple(ds.templates))
    clf = torch.load(tmp_path / "clf.pt", map_location="cpu", weights_only=True)
    assert clf.shape == mine.T.shape
    assert float((clf - mine.T).abs().max()) < 1e-6  # measured: 0.0 (bit-identical)
    # and the same per-sample predictions: its mean per-class recall from ours
    from sklearn.metrics import balanced_accuracy_score

    preds, labels = [], []
    for batch in make_eval_loader(ds.urls, tok, cfg.model.image_size, 128, cfg.model.text.context_length,
                                  cfg.data.mean, cfg.data.std):
        preds.append((model.encode_image(batch["image"].float()) @ mine.T).argmax(dim=1))
        labels.append(batch["cls"])
    balanced = balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(preds).numpy())
    assert np.isclose(theirs["mean_per_class_recall"], balanced, rtol=0, atol=1e-9)
