"""`pretrain eval` of a fine-tuned classifier (`train.task=classify`, `pretrain.evaluation.classifier_eval`):
before, it was refused by name ("a fine-tuned classifier ... which this command does not read").

- its numbers are `classify_metrics`' (what fine-tune validation and the WiSE-FT sweep report) on the same
  model and shards, from a weights export and a universal checkpoint, on shard URLs and a dataset folder,
  in one process and on 2 gloo ranks;
- a class-names file that differs from the checkpoint's (given, or found beside the shards) is refused
  naming both; the same file is accepted;
- flags that need a text tower or compare CLIP checkpoints are refused in one line naming the flag;
- a CLIP checkpoint still evaluates (zero-shot keys, no classify keys).

Random-init tiny models on real tiny shards (tests/tiny.py)."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import TINY_INFER, write_tiny_weights

from pretrain.checkpoint.sources import DictSource, open_source
from pretrain.checkpoint.universal import write_universal, write_weights
from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config, to_dict
from pretrain.evaluation.classifier_eval import evaluate_classifier
from pretrain.evaluation.classify import classify_metrics
from pretrain.evaluation.evaluate import read_classnames
from pretrain.models.classifier import ClassifierModel

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_KEYS = {"classify_top1", "classify_top5", "classify_loss", "samples", "labelled", "skipped", "classes"}


class _WithMoments(DictSource):
    """In-memory weights with zero Adam moments: what `write_universal` needs to write a universal folder."""

    has_optimizer = True

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        w = self.state[name].float()
        return w if key == "fp32" else torch.zeros_like(w)


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory) -> dict:
    from data_pipelines.synth import write_synthetic_shards

    d = tmp_path_factory.mktemp("classifier_eval")
    val = write_synthetic_shards(d / "val", samples=40, samples_per_shard=20, image_size=32, seed=1)
    names = read_classnames(val["classnames"])
    cfg = load_config(embedded_config_path(), [*TINY_INFER, "train.task=classify",
                                               f"finetune.classnames={val['classnames']}"])
    torch.manual_seed(0)
    model = ClassifierModel.from_config(cfg, len(names))
    with torch.no_grad():  # a head that tells classes apart (the fresh one is all zeros: every logit ties)
        model.head.weight.normal_(std=3.0)
        model.head.bias.normal_(std=0.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"config": to_dict(cfg), "tokenizer": tiny_tok.to_json(), "step": 7, "classnames": names}
    write_weights(DictSource(state, meta, "fine-tune"), d / "weights", overwrite=True)
    write_universal(_WithMoments(state, meta, "fine-tune"), d / "universal", overwrite=True)
    other = d / "other.txt"
    other.write_text("\n".join([*names, "extra class"]) + "\n")
    renamed = d / "renamed.txt"
    renamed.write_text("\n".join([names[0], "not a " + names[1], *names[2:]]) + "\n")
    return {"d": d, "urls": val["urls"], "classnames": val["classnames"], "names": names, "cfg": cfg,
            "state": state, "weights": str(d / "weights"), "universal": str(d / "universal"),
            "other": str(other), "renamed": str(renamed),
            "clip": str(write_tiny_weights(d / "clip", tiny_tok))}


def _eval(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["eval", *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out.strip().splitlines()[-1]) if code == 0 else None), out.err


def _expected(setup: dict, tok, batch_size: int = 128, max_samples: int = 0) -> dict:
    """classify_metrics on the same model, built here from the weights in memory (not from the checkpoint)."""
    model = ClassifierModel.from_config(setup["cfg"], len(setup["names"]))
    model.load_state_dict(setup["state"])
    return classify_metrics(model.eval(), tok, setup["cfg"], setup["urls"], batch_size, max_samples)


@pytest.mark.parametrize("kind", ["weights", "universal"])
def test_eval_reports_classify_metrics_of_the_checkpoint(setup, tiny_tok, capsys, kind):
    code, got, err = _eval(capsys, "--checkpoint", setup[kind], "--data", setup["urls"])
    assert code == 0, err
    want = _expected(setup, tiny_tok)
    assert set(got) >= NEW_KEYS, got
    for k in ("top1", "top5", "loss"):  # exactly: the same function on the same weights and shards
        assert got[f"classify_{k}"] == want[k], k
    assert (got["samples"], got["labelled"], got["skipped"]) == (want["samples"], want["labelled"], {})
    assert got["samples"] == 40 and got["classes"] == len(setup["names"])
    assert 0.0 < got["classify_top1"] <= got["classify_top5"] <= 1.0  # the random head is not all ties
    assert "zeroshot_top1" not in got


def test_max_samples_batch_size_and_a_dataset_folder(setup, tiny_tok, capsys):
    """--max-samples / --batch-size reach classify_metrics; --data as the folder (and an explicit
    --classnames equal to the checkpoint's) reads the same shards."""
    code, capped, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["urls"],
                              "--max-samples", "13", "--batch-size", "4")
    assert code == 0, err
    want = _expected(setup, tiny_tok, 4, 13)
    assert capped["samples"] == 13 and capped["classify_top1"] == want["top1"]
    assert capped["classify_loss"] == pytest.approx(want["loss"], abs=1e-6)
    code, folder, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", str(setup["d"] / "val"),
                              "--classnames", setup["classnames"])
    assert code == 0, err
    assert folder["classify_top1"] == _expected(setup, tiny_tok)["top1"] and folder["samples"] == 40


def _rank(rank: int, init: str, out: str, s: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = evaluate_classifier(open_source(s["weights"]), s["urls"], batch_size=8)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_give_the_single_process_numbers(setup, tiny_tok, tmp_path):
    """Under a launcher each rank scores one shard; the gathered counts are the single process's."""
    s = {k: setup[k] for k in ("weights", "urls")}
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), s), nprocs=2, join=True)
    want = _expected(setup, tiny_tok, 8)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (got["classify_top1"], got["classify_top5"]) == (want["top1"], want["top5"]), rank
        assert got["samples"] == 40, rank
        assert got["classify_loss"] == pytest.approx(want["loss"], abs=1e-6), rank


@pytest.mark.parametrize("which, diff", [("other", "holds 33 classes"),
                                         ("renamed", "holds other names (class 1: 'not a ")])
def test_other_classnames_are_refused_naming_both(setup, capsys, which, diff):
    code, _, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["urls"],
                         "--classnames", setup[which])
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"pretrain: error: {setup[which]} (--classnames) {diff}"), line
    assert f"fine-tuned on the 32 classes of {setup['classnames']}" in line, line


def test_a_different_classnames_txt_beside_the_shards_is_refused(setup, capsys, tmp_path):
    for f in Path(setup["urls"].split("shard-")[0]).glob("*.tar"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(setup["other"], tmp_path / "classnames.txt")
    code, _, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", str(tmp_path))
    assert code == 2, err
    found = tmp_path / "classnames.txt"
    assert f"{found} (classnames.txt found beside the shards) holds 33 classes" in err, err
    (tmp_path / "classnames.txt").unlink()  # none beside the shards: the checkpoint's names are used
    code, got, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", str(tmp_path))
    assert code == 0 and got["samples"] == 40, err


@pytest.mark.parametrize("flag", [["--linear-probe", "{urls}"], ["--few-shot", "2"],
                                  ["--few-shot", "2", "--linear-probe", "{urls}"], ["--rerank", "4"],
                                  ["--binding"], ["--templates", "{classnames}"],
                                  ["--suite", "{d}/suite.yaml", "--out", "{d}/o"],
                                  ["--plot", "classify_top1", "--out", "{d}/o"]])
def test_flags_without_meaning_for_a_classifier_are_refused_by_name(setup, capsys, flag):
    argv = ["--checkpoint", setup["weights"], *[a.format(**setup) for a in flag]]
    if "--suite" not in flag:
        argv += ["--data", setup["urls"]]
    code, _, err = _eval(capsys, *argv)
    named = "--linear-probe" if flag[0] == "--few-shot" and len(flag) > 2 else flag[0]
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"pretrain: error: {named} does not apply to {setup['weights']}: a fine-tuned "
                           "classifier (train.task=classify"), line
    assert len(err.strip().splitlines()) == 1, err


def test_a_clip_checkpoint_still_evaluates_zero_shot(setup, capsys):
    code, got, err = _eval(capsys, "--checkpoint", setup["clip"], "--data", setup["urls"])
    assert code == 0, err
    assert {"zeroshot_top1", "i2t_r1", "samples", "skipped"} <= set(got)
    assert not any(k.startswith("classify_") for k in got), got
