"""scripts/probe_image_tokens.py (#20's diagnosis): the probes run on a model and decode colours where the
tokens hold them. Even a random-init tower's patch tokens are a linear map of their pixels, so the spatial
probe must beat chance by far; a probe that reads the wrong labels or the wrong tokens would not."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
from tiny import ROOT

from pretrain.config import embedded_config_path, load_config
from pretrain.models.pretrain_model import PretrainModel


def _script(name: str):
    """A module of scripts/ by file name (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _caption_model():
    """(A random-init small model, a tokenizer trained on compositional captions, its config)."""
    from data_pipelines.synth import make_pair_sample
    from data_pipelines.tokenizer import train_tokenizer

    cfg = load_config(embedded_config_path(), ["model.image_size=16", "model.vision.width=32",
                                               "model.vision.layers=1", "model.text.width=32",
                                               "model.text.layers=1", "model.embed_dim=16"])
    tok = train_tokenizer([make_pair_sample(i, 16, 7)["txt"].decode() for i in range(300)], vocab_size=200)
    torch.manual_seed(0)
    return PretrainModel.from_config(cfg, tok).eval(), tok, cfg


def test_patch_token_probe_decodes_colours_of_a_random_tower(one_thread):
    mod = _script("probe_image_tokens")
    cfg = load_config(embedded_config_path(), ["model.image_size=16", "model.vision.width=32",
                                               "model.vision.layers=1", "model.text.width=32",
                                               "model.text.layers=1", "model.embed_dim=16"])
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.objectives, vocab_size=64).eval()
    out = mod.probe(model, cfg, n_train=300, n_test=100)
    probes = {f"{tok}_{side}_{what}" for tok in ("cls", "patches") for side in ("left", "right")
              for what in ("colour", "shape")}
    assert set(out) == {"chance", "chance_shape", "patch_side_from_content"} | probes
    assert out["patches_left_colour"] > 3 * out["chance"] and out["patches_right_colour"] > 3 * out["chance"]


def test_caption_probe_reads_which_colour_the_caption_puts_on_the_left(one_thread):
    """The text side (`text_probe`): from the caption's states the left object's colour is decodable well
    above chance even on a random-init text tower (its token states keep the words and their order); a
    probe that read labels not matching its captions would sit at chance (1/8)."""
    mod = _script("probe_image_tokens")
    model, tok, cfg = _caption_model()
    out = mod.text_probe(model, tok, cfg, n_train=400, n_test=150)
    want = {f"text_{where}_{side}_colour" for where in ("eos", "tokens") for side in ("left", "right")}
    assert set(out) == want
    assert out["text_tokens_left_colour"] > 2 / 8 and out["text_tokens_right_colour"] > 2 / 8


def test_relation_learnability_labels_the_masked_relation_word_and_trains_every_arm(one_thread):
    """scripts/relation_learnability.py: each sample's label is its caption's relation ("right" = 1), the word
    is masked in the text the fusion encoder reads (its states differ from the unmasked caption's there),
    and the three arms train and report held-out accuracies."""
    from data_pipelines.synth import make_pair_sample

    mod = _script("relation_learnability")
    model, tok, cfg = _caption_model()
    data = mod.relation_data(model, tok, cfg, n=40, seed=5, batch=16)
    captions = [make_pair_sample(i, 16, 5)["txt"].decode() for i in range(40)]
    assert data["label"].tolist() == [int("right of" in c) for c in captions]
    assert 0 < int(data["label"].sum()) < 40
    L = cfg.model.text.context_length
    plain = model.text.forward_tokens(tok.encode_batch(captions, L), causal=False)
    r = torch.arange(40)
    assert not torch.allclose(plain[r, data["pos"]], data["text"][r, data["pos"]])  # the word was masked
    rows = [row for positions in (False, True)
            for row in mod.train_arm(data, data, 16, 2, positions, steps=4, seed=0, every=2)]
    for residual in (False, True):
        rows += mod.train_mlm_arm(model, tok, data, data, 16, 2, mask_prob=0.3, steps=4, seed=0, every=2,
                                  residual=residual)
    want = [(arm, step) for arm in ("as-is", "positions", "mlm", "mlm-residual") for step in (0, 2, 4)]
    assert [(row["arm"], row["step"]) for row in rows] == want
    assert all(0 <= row["accuracy"] <= 1 and row["loss"] > 0 for row in rows)


def test_relation_learnability_itm_arm_pairs_each_image_with_its_object_swap(one_thread):
    """The `itm-objects` arm's data: every image's true caption and its object swap, as ITM reads them (the
    causal pass; pool positions at EOS), and the arm trains and scores pairwise."""
    from data_pipelines.synth import make_pair_sample

    mod = _script("relation_learnability")
    model, tok, cfg = _caption_model()
    data = mod.swap_data(model, tok, cfg, n=24, seed=5, batch=10)
    L = cfg.model.text.context_length
    swaps = [json.loads(make_pair_sample(i, 16, 5)["json"])["swapped_objects"] for i in range(24)]
    assert torch.allclose(data["swap"], model.text_tokens(tok.encode_batch(swaps, L)).float())
    assert torch.equal(data["true_pos"], model.text.pool_positions(
        tok.encode_batch([make_pair_sample(i, 16, 5)["txt"].decode() for i in range(24)], L)))
    assert not torch.allclose(data["true"], data["swap"])  # the same words in another order
    rows = mod.train_itm_arm(data, data, 16, 2, steps=4, seed=0, every=2)
    assert [r["step"] for r in rows] == [0, 2, 4] and all(0 <= r["accuracy"] <= 1 for r in rows)
    with_positions = mod.train_itm_arm(data, data, 16, 2, steps=4, seed=0, every=2, positions=True)
    assert {r["arm"] for r in rows} == {"itm-objects"} and {r["arm"] for r in with_positions} == {
        "itm-objects-positions"}
    assert [r["loss"] for r in with_positions] != [r["loss"] for r in rows]  # the positions are in the pass
    colours = [json.loads(make_pair_sample(i, 16, 5)["json"])["swapped_colours"] for i in range(24)]
    assert torch.allclose(data["colour"], model.text_tokens(tok.encode_batch(colours, L)).float())
    mixed = mod.train_itm_arm(data, data, 16, 2, steps=4, seed=0, every=2, positions=True, mixed_steps=5,
                              name="itm-mixed-positions")
    assert {r["arm"] for r in mixed} == {"itm-mixed-positions"} and all(0 <= r["colours"] <= 1 for r in mixed)
    assert mixed[0]["loss"] != with_positions[0]["loss"]  # five pairs per image, not two
    # mixed for the first step only: the steps after it are the plain arm's again, from another state
    once = mod.train_itm_arm(data, data, 16, 2, steps=4, seed=0, every=2, positions=True, mixed_steps=1)
    assert once[0]["loss"] == mixed[0]["loss"] and once[-1]["loss"] != mixed[-1]["loss"]


def test_itm_pair_mix_scores_the_chosen_pairs_and_switches_to_the_stage_mix(one_thread):
    """scripts/itm_pair_mix.py: the pairs per step are the ones asked for (the loss of the first step tells
    them apart), `--mixed-from` / `--mixed-until` switch at the step named, weights and the logit penalty
    enter the loss, and positions can be drawn larger or left unstepped."""
    mod = _script("itm_pair_mix")
    model, tok, cfg = _caption_model()
    data = _script("relation_learnability").swap_data(model, tok, cfg, n=24, seed=5, batch=12)

    def run(**changes):
        args = argparse.Namespace(seed=0, steps=3, batch=8, kinds="objects", mixed=False, mixed_until=-1,
                                  mixed_from=10**9, optim="script", weights="", logit_penalty=0.0,
                                  position_std=0.0, freeze_positions=False, text_positions=False,
                                  tower_lr=0.1, layers=2, lr=1e-3, position_init="normal")
        vars(args).update(changes)
        return [r["loss"] for r in mod.train(data, data, 16, 2, args, every=1)]

    objects, mixed = run(), run(mixed=True)
    assert objects[0] != mixed[0]
    assert run(kinds="objects,colours,batch-caption,batch-image") == mixed  # --mixed is the four kinds
    switched = run(mixed_from=2)
    assert switched[:2] == objects[:2] and switched[2] != objects[2]
    assert run(mixed_until=1)[0] == mixed[0] and run(mixed_until=1)[1:] != mixed[1:]
    assert run(weights="positive=1,objects=1") == objects and run(weights="objects=4")[0] != objects[0]
    assert run(logit_penalty=0.5)[0] > objects[0]  # a non-negative penalty added
    assert run(optim="stage")[0] == objects[0] and run(optim="stage")[1:] != objects[1:]
    assert run(position_std=1.0)[0] != objects[0]  # other positions in the first pass
    frozen = run(freeze_positions=True)
    assert frozen[0] == objects[0] and frozen[1:] != objects[1:]  # same start, positions not stepped
    assert run(text_positions=True)[0] != objects[0]  # caption positions in the first pass
    assert run(layers=3)[0] != objects[0]  # another encoder
    assert run(position_init="sincos")[0] != objects[0]  # the sine-cosine table in the first pass
    faster = run(lr=1e-2)
    assert faster[0] == objects[0] and faster[1:] != objects[1:]  # same start, larger steps


def test_itm_pair_mix_train_towers_steps_the_towers_from_the_cached_tokens_starting_point(one_thread):
    """`--train-towers`: the tokens come from the towers at every step. Untrained (learning rate x 0) they
    give the cached states' losses; trained, the towers' parameters move and the later losses differ."""
    mod = _script("itm_pair_mix")
    model, tok, cfg = _caption_model()
    data = mod.swap_data(model, tok, cfg, n=24, seed=5, batch=12)
    assert data["pixels"].shape[0] == 24 and torch.equal(data["true_ids"][:, 0], data["swap_ids"][:, 0])

    def run(towers, tower_lr):
        args = argparse.Namespace(seed=0, steps=3, batch=8, kinds="objects", mixed=False, mixed_until=-1,
                                  mixed_from=10**9, optim="script", weights="", logit_penalty=0.0,
                                  position_std=0.0, freeze_positions=False, text_positions=False,
                                  tower_lr=tower_lr, layers=2, lr=1e-3, position_init="normal")
        return [r["loss"] for r in mod.train(data, data, 16, 2, args, every=1, towers=towers)]

    frozen = run(None, 0.1)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    model.requires_grad_(True)
    assert run(model, 0.0) == pytest.approx(frozen, abs=1e-5)  # lr 0: the cached tokens, step by step
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())
    trained = run(model, 1.0)
    assert trained[0] == pytest.approx(frozen[0], abs=1e-5)
    assert trained[1:] != pytest.approx(frozen[1:], abs=1e-5)
    moved = [n for n, q in model.named_parameters() if not torch.equal(q, before[n])]
    assert any(n.startswith("visual.") for n in moved) and any(n.startswith("text.") for n in moved)


def test_itm_pair_mix_text_from_takes_another_runs_captions_and_keeps_the_images(one_thread, monkeypatch):
    """`--text-from RUN`: every caption key comes from RUN's text tower, the image tokens stay this run's."""
    import pretrain.evaluation.evaluate as evaluate

    mod = _script("itm_pair_mix")
    model, tok, cfg = _caption_model()
    torch.manual_seed(1)
    other = PretrainModel.from_config(cfg, tok).eval()  # another text tower, same tokenizer
    monkeypatch.setattr(evaluate, "load_model", lambda run_dir: (other, tok, cfg))
    mine = mod.swap_data(model, tok, cfg, n=12, seed=5, batch=6)
    theirs = mod.swap_data(other, tok, cfg, n=12, seed=5, batch=6)
    mixed = mod.with_captions_of(mine, "elsewhere", 12, 5)
    assert torch.equal(mixed["image"], mine["image"]) and not torch.equal(mixed["image"], theirs["image"])
    for key in ("true", "swap", "colour", "true_pad", "swap_pos"):
        assert torch.equal(mixed[key], theirs[key])
    assert not torch.equal(mixed["true"], mine["true"])


def test_itm_pairs_draw_from_a_pool_and_report_held_out_groups(one_thread):
    """`draw_from` (`--one-relation-until`): a step's batch comes from the rows it names; `test_groups` add
    `objects_<name>` rows, whose row-weighted mean is the overall object-swap accuracy."""
    mod = _script("relation_learnability")
    model, tok, cfg = _caption_model()
    data = mod.swap_data(model, tok, cfg, n=24, seed=5, batch=12)
    only3 = {k: v[[3] * 24] for k, v in data.items()}
    kw = {"batch": 8, "every": 1}
    pooled = mod.train_itm_pairs(data, data, 16, 2, 0, 0, draw_from=lambda step: torch.tensor([3]), **kw)
    assert pooled[0]["loss"] == mod.train_itm_pairs(only3, data, 16, 2, 0, 0, **kw)[0]["loss"]
    plain = mod.train_itm_pairs(data, data, 16, 2, 0, 0, **kw)[0]["loss"]
    assert mod.train_itm_pairs(data, data, 16, 2, 0, 0, row_weight=torch.ones(24), **kw)[0]["loss"] == plain
    tilted = torch.where(torch.arange(24) % 2 == 0, 1.0, 0.01)  # odd rows' pairs nearly out of the mean
    assert mod.train_itm_pairs(data, data, 16, 2, 0, 0, row_weight=tilted, **kw)[0]["loss"] != plain
    half = torch.arange(24) < 10
    rows = mod.train_itm_pairs(data, data, 16, 2, 1, 0, test_groups={"a": half, "b": ~half}, **kw)
    for r in rows:
        assert r["objects"] == pytest.approx((10 * r["objects_a"] + 14 * r["objects_b"]) / 24, abs=1e-3)


def test_sincos_table_puts_each_patch_column_on_a_linear_feature():
    """The 2D sine-cosine table: CLS row zero, one distinct row per patch, and its column channels equal for
    patches of one column (so a linear readout of the side exists from the first step)."""
    table = _script("relation_learnability").sincos_2d(16, 8)  # 4 x 4 grid
    assert table.shape == (17, 8) and torch.equal(table[0], torch.zeros(8))
    grid = table[1:].view(4, 4, 8)  # [row, col, W]
    assert torch.equal(grid[0, :, :4], grid[3, :, :4]) and not torch.equal(grid[:, 0, :4], grid[:, 1, :4])
    assert len({tuple(r.tolist()) for r in table[1:]}) == 16
    with pytest.raises(ValueError, match="not a square grid"):
        _script("relation_learnability").sincos_2d(12, 8)


def test_itm_pair_mix_refuses_weights_it_cannot_read_naming_the_item():
    mod = _script("itm_pair_mix")
    assert mod.weights_problem("positive=4,objects=4,batch-image=0.5") is None
    assert "'object=4'" in mod.weights_problem("object=4")  # a misspelt kind would be silently unused
    assert "'objects'" in mod.weights_problem("objects")
    assert "'four' is not a number" in mod.weights_problem("objects=four")


def test_itm_pair_mix_refuses_a_share_or_weight_it_cannot_use():
    """`--left-share 0` would divide by zero and a negative `--right-weight` would flip the loss: both are
    refused by name before any run is loaded."""
    import subprocess
    import sys

    for flag, value, message in (("--left-share", "0", "is not a share in (0, 1]"),
                                 ("--right-weight", "-1", "is negative")):
        script = str(ROOT / "scripts" / "itm_pair_mix.py")
        r = subprocess.run([sys.executable, script, "no-such-run", flag, value], capture_output=True,
                           text=True)
        assert r.returncode == 2 and f"{flag}: " in r.stderr and message in r.stderr
