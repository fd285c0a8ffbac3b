"""`pretrain eval`, the linear probe, validation (contrastive and classification) and WiSE-FT's accuracy say
how many held-out samples the loader skipped: `skipped` ({reason: count}, summed over every stream of every
rank) beside `samples`, and a warning naming the shards. Before, a held-out set with corrupt samples gave
metrics over fewer samples with nothing in the output saying so.

The shards (real tars): shard 0 holds only bad samples (with 2 workers, or 2 ranks, one stream reads nothing
usable and reports its skips in a zero-row batch); shard 1 holds six good labelled samples with a corrupt
one among them, so several of its batches carry the same cumulative count (summing every batch would count
it three times)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datautil import image_bytes, write_tar
from tiny import TINY_INFER, write_tiny_weights

from pretrain.cli import main
from pretrain.config import embedded_config_path, load_config
from pretrain.evaluation.classify import classify_metrics
from pretrain.evaluation.evaluate import evaluate, load_model
from pretrain.evaluation.validate import Validator

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = {"bad_image": 3, "missing_caption": 1}
"""Every bad sample of the two shards."""
IN_FIRST_5 = {"bad_image": 2, "missing_caption": 1}
"""Those among the first five positions (shard 0's three, then two good samples of shard 1)."""


def _good(key: str, i: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", image_bytes(colour=(30 * i, 90, 160))), (f"{key}.txt", f"a square {i}".encode()),
            (f"{key}.cls", str(i % 2).encode())]


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("eval_skips")
    write_tar(d / "shard-000000.tar", [("x0.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("x0.txt", b"a caption"),
                                       ("x0.cls", b"0"), ("x1.jpg", b"\x00" * 300), ("x1.txt", b"a caption"),
                                       ("x1.cls", b"1"), ("x2.jpg", image_bytes()), ("x2.cls", b"0")])
    good = [_good(f"g{i}", i) for i in range(6)]
    bad = [("y0.jpg", image_bytes()[:80]), ("y0.txt", b"a caption"), ("y0.cls", b"1")]  # truncated JPEG
    members = [m for g in good[:2] for m in g] + bad + [m for g in good[2:] for m in g]
    write_tar(d / "shard-000001.tar", members)
    (d / "classnames.txt").write_text("zero\none\n")
    weights = write_tiny_weights(d / "weights", tiny_tok)
    return {"weights": str(weights), "urls": f"{d}/shard-{{000000..000001}}.tar",
            "classnames": str(d / "classnames.txt")}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_reports_the_skipped_samples(setup, workers, caplog):
    with caplog.at_level(logging.WARNING, "mmpt.eval"):
        out = evaluate(setup["weights"], setup["urls"], setup["classnames"], batch_size=2, workers=workers)
    assert out["samples"] == 6
    assert out["skipped"] == PLANTED
    assert f"eval data {setup['urls']}: 4 skipped (bad_image 3, missing_caption 1)" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cap_counts_the_skips_among_its_positions(setup, workers):
    out = evaluate(setup["weights"], setup["urls"], setup["classnames"], batch_size=2, workers=workers,
                   max_samples=5)
    assert out["samples"] == 2 and out["skipped"] == IN_FIRST_5


def test_the_cli_json_and_the_linear_probe_report_them(setup, capsys):
    code = main(["eval", "--checkpoint", setup["weights"], "--data", setup["urls"], "--classnames",
                 setup["classnames"], "--linear-probe", setup["urls"], "--workers", "2", "--batch-size", "2",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == out["linear_probe_test_samples"] == out["linear_probe_train_samples"] == 6
    assert out["skipped"] == out["linear_probe_train_skipped"] == PLANTED


def test_a_clean_set_reports_nothing_skipped(setup, tmp_path, caplog):
    write_tar(tmp_path / "clean.tar", [m for i in range(4) for m in _good(f"c{i}", i)])
    with caplog.at_level(logging.WARNING, "mmpt.eval"):
        out = evaluate(setup["weights"], str(tmp_path / "clean.tar"), setup["classnames"], batch_size=2)
    assert out["samples"] == 4 and out["skipped"] == {}
    assert "skipped" not in caplog.text


def test_validation_reports_them(setup):
    model, tok, cfg = load_model(setup["weights"])
    cfg.data.val, cfg.eval.every, cfg.eval.batch_size = setup["urls"], 1, 2
    cfg.eval.classnames = setup["classnames"]
    row = Validator(cfg, tok, model, lambda b: b, torch.float32).run(1)
    assert row["val/samples"] == 6 and row["val/skipped"] == PLANTED
    assert "val/loss" in row and "val/zeroshot_top1" in row


class _Head(torch.nn.Module):
    """A two-class classifier on raw pixels: what `classify_metrics` calls (`logits`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3 * 32 * 32, 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.lin(images.flatten(1).float())


@pytest.mark.parametrize("workers", [0, 2])
def test_classification_accuracy_reports_them(setup, tiny_tok, workers):
    cfg = load_config(embedded_config_path(), TINY_INFER)
    m = classify_metrics(_Head(), tiny_tok, cfg, setup["urls"], 2, workers=workers)
    # a classifier reads image + label: the caption-less labelled sample counts, it is not a skip here
    assert m["samples"] == m["labelled"] == 7 and m["skipped"] == {"bad_image": 3}


def test_a_set_of_only_bad_samples_is_named_with_its_skips(setup, tiny_tok, tmp_path):
    write_tar(tmp_path / "bad.tar", [("z.jpg", b"\x00" * 300), ("z.txt", b"a caption"), ("z.cls", b"0")])
    cfg = load_config(embedded_config_path(), TINY_INFER)
    with pytest.raises(ValueError, match=r"no readable sample with a .cls label.*'bad_image': 1"):
        classify_metrics(_Head(), tiny_tok, cfg, str(tmp_path / "bad.tar"), 2)
    with pytest.raises(ValueError, match=r"no readable samples to evaluate.*'bad_image': 1"):
        evaluate(setup["weights"], str(tmp_path / "bad.tar"), setup["classnames"], batch_size=2)


# ------------------------------------------------------------------------------- 2 gloo ranks
def _rank(rank: int, init: str, out: str, s: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        whole = evaluate(s["weights"], s["urls"], s["classnames"], batch_size=2, workers=2)
        capped = evaluate(s["weights"], s["urls"], s["classnames"], batch_size=2, max_samples=5)
        result = {k: {"samples": r["samples"], "skipped": r["skipped"]}
                  for k, r in (("whole", whole), ("capped", capped))}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_sum_the_skips_of_every_rank(setup, tmp_path):
    """Rank 0 reads only the all-bad shard (whole shards), or every other position (a cap): each rank
    alone holds part of the counts; every rank reports the sum."""
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), setup), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"whole": {"samples": 6, "skipped": PLANTED},
                       "capped": {"samples": 2, "skipped": IN_FIRST_5}}, rank
