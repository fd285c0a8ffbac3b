"""A classifier reads the standard labelled image WebDataset formats (image + `.cls`, no `.txt` caption:
what clip_benchmark_export_wds and timm write): fine-tuning (`train.task=classify`: training loader and
validation), `pretrain eval` of a classifier (`classify_metrics`, the data layout check) and the ONNX
classifier's static-int8 calibration. Before, every such sample was skipped as `missing_caption` (or the
shards refused up front for want of a `.txt`).

For a classifier a missing caption is no skip; a missing or unreadable `.cls` label is, counted as
`missing_label` / `bad_label` (in `skip_<reason>` metrics and in eval's `skipped`). CLIP readers still
need captions and skip the same shards as `missing_caption`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from datautil import tiny_cfg
from tiny import MICRO, TINY_INFER, run_pretrain

from data_pipelines.loader import make_eval_loader, make_train_loader
from data_pipelines.synth import CLASSNAMES, make_sample
from data_pipelines.tokenizer import train_tokenizer_from_shards
from pretrain.checkpoint.sources import DictSource, open_source
from pretrain.checkpoint.universal import write_weights
from pretrain.config import embedded_config_path, load_config, stream_spec, to_dict
from pretrain.evaluation.classifier_eval import evaluate_classifier
from pretrain.evaluation.classify import classify_metrics
from pretrain.evaluation.layout import resolve_eval_data
from pretrain.metrics import read_metrics
from pretrain.models.classifier import ClassifierModel
from pretrain.tasks.classify import check_labels

pytestmark = pytest.mark.usefixtures("one_thread")

PER_SHARD, SHARDS = 12, 2
NO_LABEL, BAD_LABEL = ("s0-003", "s1-005")  # one sample without a .cls, one whose .cls is no integer
GOOD = PER_SHARD * SHARDS - 2


def _write(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict:
    """Two shards of image + `.cls` only (the second with `.webp` members, as clip_benchmark_export_wds
    names them), classnames.txt beside them."""
    d = tmp_path_factory.mktemp("image_cls")
    for s in range(SHARDS):
        samples = []
        for i in range(PER_SHARD):
            raw, key = make_sample(s * PER_SHARD + i, 32, 0), f"s{s}-{i:03d}"
            sample = {"__key__": key, "webp" if s else "jpg": raw["jpg"], "cls": raw["cls"]}
            if key == NO_LABEL:
                del sample["cls"]
            if key == BAD_LABEL:
                sample["cls"] = b"dog"
            samples.append(sample)
        _write(d / f"{s}.tar", samples)
    (d / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    return {"dir": d, "urls": f"{d}/{{0..{SHARDS - 1}}}.tar", "classnames": str(d / "classnames.txt")}


@pytest.fixture(scope="module")
def classifier(labelled, tiny_tok, tmp_path_factory) -> dict:
    cfg = load_config(embedded_config_path(), [*TINY_INFER, "train.task=classify",
                                               f"finetune.classnames={labelled['classnames']}"])
    torch.manual_seed(0)
    model = ClassifierModel.from_config(cfg, len(CLASSNAMES))
    with torch.no_grad():
        model.head.weight.normal_(std=3.0)
    meta = {"config": to_dict(cfg), "tokenizer": tiny_tok.to_json(), "step": 3, "classnames": CLASSNAMES}
    folder = tmp_path_factory.mktemp("clf") / "weights"
    write_weights(DictSource(model.state_dict(), meta, "fine-tune"), folder, overwrite=True)
    return {"cfg": cfg, "model": model.eval(), "weights": folder}


def test_train_loader_of_a_classifier_reads_image_and_label_and_counts_missing_labels(labelled, tiny_tok):
    cfg = tiny_cfg(labelled["urls"], batch=GOOD)
    loader = make_train_loader(cfg.data, stream_spec(cfg), tiny_tok, 0, 1, captions=False, labels=True)
    batch = next(iter(loader))  # the whole first epoch in one batch
    assert sorted(batch["_keys"]) == sorted(f"s{s}-{i:03d}" for s in range(SHARDS) for i in range(PER_SHARD)
                                            if f"s{s}-{i:03d}" not in (NO_LABEL, BAD_LABEL))
    want = {f"s{s}-{i:03d}": int(make_sample(s * PER_SHARD + i, 32, 0)["cls"]) for s in range(SHARDS)
            for i in range(PER_SHARD)}
    assert batch["cls"].tolist() == [want[k] for k in batch["_keys"]]
    assert batch["image"].shape == (GOOD, 3, 32, 32)
    assert batch["_skips"] == {"bad_label": 1, "missing_label": 1}


def test_clip_readers_still_need_captions(labelled, tiny_tok):
    loader = make_eval_loader(labelled["urls"], tiny_tok, 32, 8, 16, (0.5,) * 3, (0.5,) * 3,
                              empty_batches=True)
    batches = list(loader)
    assert sum(len(b["_keys"]) for b in batches) == 0
    assert batches[-1]["_skips"] == {"missing_caption": PER_SHARD * SHARDS}
    with pytest.raises(ValueError, match="has no .txt caption"):
        resolve_eval_data(labelled["urls"])


def test_classify_metrics_scores_caption_less_shards(labelled, classifier, tiny_tok):
    m = classify_metrics(classifier["model"], tiny_tok, classifier["cfg"], labelled["urls"], 5)
    assert (m["samples"], m["labelled"]) == (GOOD, GOOD)
    assert m["skipped"] == {"bad_label": 1, "missing_label": 1}
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0


def test_pretrain_eval_of_a_classifier_reads_a_caption_less_set(labelled, classifier, tiny_tok):
    got = evaluate_classifier(open_source(str(classifier["weights"])), labelled["urls"], batch_size=7)
    want = classify_metrics(classifier["model"], tiny_tok, classifier["cfg"], labelled["urls"], 7)
    assert (got["classify_top1"], got["classify_loss"]) == (want["top1"], want["loss"])
    assert got["samples"] == GOOD and got["skipped"] == {"bad_label": 1, "missing_label": 1}


def test_static_int8_calibration_of_a_classifier_reads_images_without_captions(labelled, classifier,
                                                                               tiny_tok):
    from pretrain.export.onnx_convert import calibration_batches

    calib = calibration_batches(labelled["urls"], tiny_tok, classifier["cfg"], 16, 8, captions=False)
    assert sum(len(b) for b in calib["image"]) == 16
    with pytest.raises(ValueError, match="no readable sample to calibrate on"):  # CLIP: captions needed
        calibration_batches(labelled["urls"], tiny_tok, classifier["cfg"], 16, 8)


def test_label_check_and_tokenizer_message_on_caption_less_shards(labelled):
    check_labels(labelled["urls"], len(CLASSNAMES), "data.train (--train)")  # labels there: accepted
    with pytest.raises(ValueError, match=r"no \.txt captions.*data\.tokenizer"):
        train_tokenizer_from_shards(labelled["urls"], 100, 50)


def test_finetune_two_steps_on_caption_less_shards(labelled, tiny_tok, tmp_path):
    tok = tmp_path / "tokenizer.json"
    tiny_tok.save(tok)
    run = tmp_path / "ft"
    r = run_pretrain(["finetune", *MICRO, "--task", "classify", "--train", labelled["urls"], "--val",
                      labelled["urls"], "--classnames", labelled["classnames"], f"run.dir={run}",
                      "train.steps=2", f"data.tokenizer={tok}", "eval.at_end=true", "data.workers=0"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith('{"steps"')))
    assert summary["steps"] == 2
    rows = read_metrics(run)
    train_rows = [row for row in rows if "skip_missing_label" in row]
    assert train_rows and train_rows[-1]["skip_missing_caption"] == 0
    assert train_rows[-1]["skip_missing_label"] <= 1 and train_rows[-1]["skip_bad_label"] <= 1
    val = [row for row in rows if "val/top1" in row]
    assert val and val[-1]["val/samples"] == GOOD
