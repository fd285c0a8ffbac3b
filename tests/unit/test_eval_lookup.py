"""Three places that read held-out shards the way `pretrain eval` does (review leftovers):

- `pretrain bench infer`'s zero-shot accuracy uses the templates file beside the shards, as `pretrain eval`
  and validation do (before: always the built-in prompts, so its top-1 differed from `pretrain eval`'s);
- `pretrain eval` on `file://` shard URLs finds classnames.txt and the templates beside them, as validation
  does (before: "no class names", the URL taken for a remote one);
- `pretrain eval --binding` reports the samples its own loader skipped (`binding_skipped`), and a corrupt
  shard among the compositional ones is skipped and counted there, not a tarfile traceback.

Real tiny shards and a random-init tiny model (tests/tiny.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datautil import image_bytes, write_tar
from tiny import write_tiny_weights

from pretrain.bench.infer import run_infer_bench
from pretrain.cli import main
from pretrain.evaluation.binding import binding_probe
from pretrain.evaluation.evaluate import evaluate, load_model
from pretrain.evaluation.layout import resolve_eval_data

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATES = "itap of a {c}.\nthe {c} drawn by a child, crayon on paper, rough.\n"
"""CLIP-style prompts unlike the built-in ones (the synth writer's file equals the built-ins)."""


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory) -> dict:
    from data_pipelines.synth import write_synthetic_shards

    d = tmp_path_factory.mktemp("eval_lookup")
    val = write_synthetic_shards(d / "val", samples=48, samples_per_shard=24, image_size=32, seed=1)
    (d / "val" / "zeroshot_classification_templates.txt").write_text(TEMPLATES)
    return {"d": d, "urls": val["urls"], "classnames": val["classnames"],
            "weights": str(write_tiny_weights(d / "weights", tiny_tok))}


# --------------------------------------------------------------------- 1: bench infer reads eval's templates
def test_bench_infer_zero_shot_equals_pretrain_eval_with_a_templates_file(setup, tmp_path):
    bundle = load_model(setup["weights"])
    ds = resolve_eval_data(setup["urls"])
    assert ds.templates_file == setup["d"] / "val" / "zeroshot_classification_templates.txt"
    ours = evaluate(None, ds.urls, ds.classnames, batch_size=16, model_bundle=bundle, templates=ds.templates)
    builtin = evaluate(None, ds.urls, ds.classnames, batch_size=16, model_bundle=bundle)
    assert ours["zeroshot_top1"] != builtin["zeroshot_top1"]  # the prompts matter on this model
    res = run_infer_bench(tmp_path / "out", setup["weights"], setup["urls"], setup["classnames"],
                          ["torch:fp32"], batch=4, iters=1, latency_iters=1, max_samples=0, calib_samples=8,
                          overrides=[])
    assert res["variants"]["torch:fp32"]["zeroshot_top1"] == round(ours["zeroshot_top1"], 4)
    assert res["zeroshot_top1_evaluate"] == ours["zeroshot_top1"]


# ----------------------------------------------------------------------- 2: file:// URLs find the files
def test_eval_finds_classnames_and_templates_beside_file_urls(setup, capsys):
    urls = "file://" + setup["urls"]
    ds = resolve_eval_data(urls)
    assert ds.classnames == Path(setup["classnames"])
    assert ds.templates_file == setup["d"] / "val" / "zeroshot_classification_templates.txt"
    code = main(["eval", "--checkpoint", setup["weights"], "--data", urls, "--batch-size", "16", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    plain = resolve_eval_data(setup["urls"])
    ref = evaluate(None, plain.urls, plain.classnames, batch_size=16,
                   model_bundle=load_model(setup["weights"]), templates=plain.templates)
    assert out["samples"] == 48 and out["zeroshot_top1"] == ref["zeroshot_top1"]


# ------------------------------------------------------------------------ 3: --binding counts its skips
@pytest.fixture(scope="module")
def compositional(tmp_path_factory) -> dict:
    from data_pipelines.synth import write_synthetic_shards

    d = tmp_path_factory.mktemp("binding")
    comp = write_synthetic_shards(d, samples=8, samples_per_shard=8, image_size=32, seed=3,
                                  compositional=True)
    swaps = json.dumps({"swapped_colours": "a blue circle", "swapped_objects": "a circle red"}).encode()
    write_tar(d / "bad-000000.tar", [("b0.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("b0.txt", b"a red circle"),
                                     ("b0.json", swaps), ("b1.jpg", image_bytes()), ("b1.json", swaps)])
    (d / "empty-000000.tar").write_bytes(b"")  # unreadable: the main pass counts it as bad_shard
    return {"urls": f"{comp['urls']}::{d}/bad-000000.tar::{d}/empty-000000.tar"}


def test_binding_reports_the_samples_its_loader_skipped(setup, compositional, caplog):
    model, tok, cfg = load_model(setup["weights"])
    out = binding_probe(model, tok, cfg, compositional["urls"])
    assert out["binding_samples"] == 8
    assert out["binding_skipped"] == {"bad_image": 1, "missing_caption": 1, "bad_shard": 1}
    main_pass = evaluate(None, compositional["urls"], setup["classnames"], batch_size=16,
                         model_bundle=(model, tok, cfg), require_labels=False)
    assert out["binding_skipped"] == main_pass["skipped"]  # the same samples as the main pass


def test_binding_on_clean_shards_reports_nothing_skipped(setup, tmp_path):
    from data_pipelines.synth import write_synthetic_shards

    comp = write_synthetic_shards(tmp_path, samples=4, samples_per_shard=4, image_size=32, seed=4,
                                  compositional=True)
    model, tok, cfg = load_model(setup["weights"])
    out = binding_probe(model, tok, cfg, "file://" + comp["urls"])
    assert out["binding_samples"] == 4 and out["binding_skipped"] == {}
