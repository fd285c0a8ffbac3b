"""Eval inputs that used to give wrong numbers or a traceback (review-evalbench 1, 4, 5, 7, 8, 9):

- a class-names file with fewer names than the largest `.cls` label (another dataset's file): refused by
  `pretrain eval`, in-training validation and fine-tune validation, naming the file, its size, the label
  and the shard (before: those samples counted as misses, exit 0);
- validation reads the templates file beside `data.val` as `pretrain eval` does, so their zero-shot numbers
  agree (before: validation always used the built-in prompts);
- `--rerank` keeps the pair among the K candidates when it ties with the K-th (plain recall's tie rule);
- an empty first shard is skipped and counted like any unreadable shard (before: a tarfile traceback);
- repeated class names are warned about once, naming them and their indices;
- `--max-samples -5` is refused naming the flag.

Real tiny shards and a random-init tiny model (tests/tiny.py)."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from tiny import TINY_INFER, write_tiny_weights

from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config
from pretrain.evaluation.classify import classify_metrics
from pretrain.evaluation.distributed import metrics_from_features
from pretrain.evaluation.evaluate import evaluate, load_model, read_classnames
from pretrain.evaluation.layout import resolve_eval_data
from pretrain.evaluation.rerank import rerank_metrics, top_k
from pretrain.evaluation.validate import Validator

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATES = "itap of a {c}.\nthe {c} drawn by a child, crayon on paper, rough.\n"
"""CLIP-style prompts unlike the built-in ones (the synth writer's file equals the built-ins)."""


def _labels(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory) -> dict:
    from data_pipelines.synth import write_synthetic_shards

    d = tmp_path_factory.mktemp("eval_inputs")
    val = write_synthetic_shards(d / "val", samples=48, samples_per_shard=24, image_size=32, seed=1)
    (d / "val" / "zeroshot_classification_templates.txt").write_text(TEMPLATES)
    shards = [Path(f) for f in val["files"]]
    per_shard = [max(_labels(s)) for s in shards]
    top = max(per_shard)
    names = read_classnames(val["classnames"])
    (d / "short.txt").write_text("\n".join(names[:top]) + "\n")  # one name short of the largest label
    return {"d": d, "urls": val["urls"], "classnames": val["classnames"], "short": str(d / "short.txt"),
            "top": top, "top_shard": str(shards[per_shard.index(top)]),
            "weights": str(write_tiny_weights(d / "weights", tiny_tok))}


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args, "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------- 1: labels past the class names
def test_eval_refuses_labels_beyond_the_classnames_file(setup, capsys):
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["urls"],
                           "--classnames", setup["short"])
    assert code == 2 and out == ""
    assert f".cls label {setup['top']} (in {setup['top_shard']}) but {setup['short']} has {setup['top']} " \
           "names" in err, err


def test_validation_refuses_labels_beyond_the_classnames_file(setup):
    model, tok, cfg = load_model(setup["weights"])
    cfg.data.val, cfg.eval.every, cfg.eval.batch_size = setup["urls"], 1, 16
    cfg.eval.classnames = setup["short"]
    top = setup["top"]
    with pytest.raises(ValueError, match=rf"label {top} .*{setup['short']} has {top} names"):
        Validator(cfg, tok, model, lambda b: b, torch.float32).run(1)


class _Head(torch.nn.Module):
    """A four-class classifier on raw pixels: what `classify_metrics` calls (`logits`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3 * 32 * 32, 4)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.lin(images.flatten(1).float())


def test_finetune_validation_refuses_labels_beyond_the_head(setup, tiny_tok):
    cfg = load_config(embedded_config_path(), [*TINY_INFER, f"finetune.classnames={setup['short']}"])
    with pytest.raises(ValueError, match=rf"label {setup['top']} .*finetune.classnames \(.*short.txt\) has 4 "
                                         "names"):
        classify_metrics(_Head(), tiny_tok, cfg, setup["urls"], 16)


# ------------------------------------------------------------------ 4: validation reads eval's templates
def test_validation_uses_the_templates_file_pretrain_eval_uses(setup):
    model, tok, cfg = load_model(setup["weights"])
    cfg.data.val, cfg.eval.every, cfg.eval.batch_size, cfg.eval.max_samples = setup["urls"], 1, 16, 0
    row = Validator(cfg, tok, model, lambda b: b, torch.float32).run(1)
    ds = resolve_eval_data(setup["urls"])
    assert ds.templates_file == setup["d"] / "val" / "zeroshot_classification_templates.txt"
    ours = evaluate(None, ds.urls, ds.classnames, batch_size=16, model_bundle=(model, tok, cfg),
                    templates=ds.templates)
    builtin = evaluate(None, ds.urls, ds.classnames, batch_size=16, model_bundle=(model, tok, cfg))
    keys = ("zeroshot_top1", "zeroshot_top5")
    assert [ours[k] for k in keys] != [builtin[k] for k in keys]  # the prompts matter on this model
    assert [row[f"val/{k}"] for k in keys] == [ours[k] for k in keys]


# ------------------------------------------------------------------------------ 5: re-ranking on ties
class _NoOpinion(torch.nn.Module):
    """An ITM head that scores every pair the same: re-ranking must then change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.itm_head = torch.nn.Linear(1, 1)
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float()

    def itm_score(self, text_tok: torch.Tensor, ids: torch.Tensor, image_tok: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(ids))


def _duplicates() -> dict[str, torch.Tensor]:
    """12 pairs, 3 distinct captions 4 times each, a perfect dual encoder (image i embeds as its caption)."""
    cap = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    which = torch.arange(12) % 3
    txt = cap[which]
    return {"image": txt.clone(), "text": txt, "cls": torch.zeros(12, dtype=torch.long),
            "ids": which[:, None].repeat(1, 4), "pixels": torch.zeros(12, 3, 2, 2)}


@pytest.mark.parametrize("k", [1, 3])
def test_rerank_keeps_the_tied_pair_among_the_candidates(k):
    feats = _duplicates()
    plain = metrics_from_features(feats, None)
    assert plain["i2t_r1"] == plain["t2i_r1"] == 1.0  # every tie counts for the pair
    m = rerank_metrics(_NoOpinion(), feats, k)
    for d in ("i2t", "t2i"):
        assert m[f"{d}_rerank_candidates_recall"] == 1.0
        assert m[f"{d}_rerank_r1"] == m[f"{d}_rerank_sim_r1"] == plain[f"{d}_r1"]


def test_top_k_puts_the_pair_first_among_ties_across_tiles():
    keys = torch.tensor([[1.0, 0.0]] * 7 + [[0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0]] * 3)
    pair = torch.tensor([6, 2, 0])
    got = top_k(q, keys, 2, block=3, pair=pair)  # the 7 equal keys span three tiles
    assert got.tolist() == [[6, 0], [2, 0], [0, 1]]
    assert top_k(q, keys, 2, block=3).tolist() == [[0, 1]] * 3  # without a pair: the lower index


# ----------------------------------------------------------------------------- 7: empty first shard
def test_an_empty_first_shard_is_skipped_and_counted(setup, capsys, tmp_path):
    empty = tmp_path / "shard-000000.tar"
    empty.write_bytes(b"")
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", str(empty),
                           "--classnames", setup["classnames"])
    assert code == 2 and out == "" and "shard-000000.tar" in err and "bad_shard" in err, err
    shutil.copy(Path(setup["urls"].split("{")[0] + "000000.tar"), tmp_path / "shard-000001.tar")
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", str(tmp_path),
                           "--classnames", setup["classnames"])
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 24 and result["skipped"] == {"bad_shard": 1}


# ---------------------------------------------------------------------------- 8: repeated class names
def test_repeated_class_names_are_warned_about_once(tmp_path, caplog):
    f = tmp_path / "classnames.txt"
    f.write_text("cat\ncrane\ndog\ncrane\ncat\nemu\n")
    with caplog.at_level(logging.WARNING, "mmpt.eval"):
        read_classnames(f)
        read_classnames(f)
    warned = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert len(warned) == 1, warned
    assert str(f) in warned[0] and "'cat' at 0, 4" in warned[0] and "'crane' at 1, 3" in warned[0]
    assert "emu" not in warned[0] and "dog" not in warned[0]


def test_distinct_class_names_are_not_warned_about(tmp_path, caplog):
    f = tmp_path / "classnames.txt"
    f.write_text("cat\ncrane\n")
    with caplog.at_level(logging.WARNING, "mmpt.eval"):
        read_classnames(f)
    assert "repeat" not in caplog.text


# ------------------------------------------------------------------------------ 9: --max-samples < 0
def test_negative_max_samples_is_refused_naming_the_flag(setup, capsys):
    code, out, err = _eval(capsys, "--checkpoint", setup["weights"], "--data", setup["urls"],
                           "--classnames", setup["classnames"], "--max-samples", "-5")
    assert code == 2 and out == "" and "--max-samples must be >= 0" in err and "-5" in err, err
