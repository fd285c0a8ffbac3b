"""Fusion encoder, image-text matching and image-conditioned MLM on one process (the tp=2 / dp=2
equivalences are in tests/e2e/test_tp_model.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import (
    ConfigError,
    DecoderConfig,
    FusionConfig,
    ModelConfig,
    ObjectivesConfig,
    TextConfig,
    VisionConfig,
    load_config,
)
from pretrain.models import PretrainModel
from pretrain.objectives.itm import caption_hash, hard_negatives, swap_words
from pretrain.parallelize import set_activation_checkpointing, tp_split_dims

PAD, BOS, MASK, EOS = 0, 1, 2, 3
B, S, P, L, V = 6, 16, 4, 8, 60
N = (S // P) ** 2


def model_cfg(layers: int = 0) -> ModelConfig:
    return ModelConfig(image_size=S, embed_dim=24, vocab_pad_multiple=64,
                       vision=VisionConfig(patch_size=P, width=32, layers=1, heads=4),
                       text=TextConfig(width=32, layers=1, heads=4, context_length=L),
                       decoder=DecoderConfig(width=16, layers=1, heads=2),
                       fusion=FusionConfig(layers=layers, width=16, heads=2))


def objectives(itm: float = 0.0, conditioned: bool = False, **weights: float) -> ObjectivesConfig:
    o = ObjectivesConfig()
    o.itm.weight, o.mlm.conditioned = itm, conditioned
    for name, w in weights.items():
        getattr(o, name).weight = w
    return o


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=gen)
    ids[:, 0] = BOS
    for i in range(B):
        e = 3 + i % (L - 3)
        ids[i, e], ids[i, e + 1:] = EOS, PAD
    mlm_input, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_input[:, 1], labels[:, 1] = MASK, ids[:, 1]
    return {"image": torch.randn(B, 3, S, S, generator=gen), "text": ids, "mlm_input": mlm_input,
            "mlm_labels": labels, "patch_noise": torch.rand(B, N, generator=gen),
            "itm_noise": torch.rand(B, 2, generator=gen)}


def build(cfg: ModelConfig, obj: ObjectivesConfig) -> PretrainModel:
    torch.manual_seed(0)
    return PretrainModel(cfg, obj, vocab_size=V, pad_id=PAD, eos_id=EOS).train()


def run(model: PretrainModel, b: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    model.zero_grad()
    out = model(b)
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad for n, p in model.named_parameters()})


def test_fusion_off_builds_nothing_and_an_unused_encoder_changes_nothing():
    off = build(model_cfg(0), objectives())
    assert off.fusion is None and off.itm_head is None
    assert not [n for n, _ in off.named_parameters() if n.startswith(("fusion", "itm_head"))]
    # an encoder no objective uses: every other parameter draws the same init, same losses and gradients
    idle = build(model_cfg(2), objectives())
    idle_params = dict(idle.named_parameters())
    for name, p in off.named_parameters():
        assert torch.equal(p, idle_params[name]), name
    out_off, g_off = run(off, batch())
    out_idle, g_idle = run(idle, batch())
    assert out_off.keys() == out_idle.keys() and "loss_itm" not in out_idle
    for k in out_off:
        assert torch.equal(out_off[k], out_idle[k]), k
    for name, g in g_off.items():
        assert torch.equal(g, g_idle[name]), name


def test_itm_loss_trains_fusion_and_both_towers():
    model = build(model_cfg(2), objectives(itm=1.0, mim=0.0, mlm=0.0))
    out, grads = run(model, batch())
    assert torch.isfinite(out["loss_itm"]) and out["loss_itm"] > 0
    for name in ("fusion.resblocks.1.cross.kv.weight", "fusion.resblocks.0.attn.qkv.weight",
                 "itm_head.fc.weight", "visual.conv1.weight", "text.token_embedding.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_conditioned_mlm_reads_the_image():
    """Only the MLM loss on: the image tower gets a gradient exactly when the MLM is conditioned."""
    plain = build(model_cfg(2), objectives(contrastive=0.0, mim=0.0))
    _, g = run(plain, batch())
    assert g["visual.conv1.weight"] is None
    cond = build(model_cfg(2), objectives(contrastive=0.0, mim=0.0, conditioned=True))
    assert cond.mlm_head.dense.in_features == 16  # reads the fusion width
    out, g = run(cond, batch())
    assert g["visual.conv1.weight"].abs().sum() > 0 and torch.isfinite(out["loss_mlm"])
    other = batch()
    other["image"] = torch.randn_like(other["image"])
    assert not torch.equal(cond(other)["loss_mlm"], out["loss_mlm"])


@pytest.mark.parametrize("shared_pass, train, tokens", [(False, True, 1 + N), (True, True, 1 + N // 2),
                                                        (True, False, 1 + N)])
def test_fusion_attends_to_the_contrastive_pass_image_tokens(shared_pass, train, tokens):
    """Separate views and eval: every patch; a shared masked pass (FLIP): its visible patches."""
    obj = objectives(itm=1.0, conditioned=True)
    obj.mim.shared_pass = shared_pass
    model = build(model_cfg(1), obj).train(train)
    seen = []
    model.fusion.register_forward_hook(lambda mod, args, out: seen.append(args[1].shape[1]))
    model(batch())
    assert seen == [tokens, tokens]  # the ITM pairs, then the conditioned MLM


def test_hard_negatives_skip_the_positive_and_duplicate_captions():
    ids = torch.tensor([[1, 5, 3], [1, 6, 3], [1, 5, 3], [1, 7, 3]])  # rows 0 and 2: the same caption
    img = torch.eye(4, 8)
    txt = img.clone()
    txt[0] = img[2]  # caption 0 looks exactly like image 2: the hardest, but it is a duplicate
    scale = torch.tensor(10.0)
    for uniform in (None, torch.rand(4, 2, generator=torch.Generator().manual_seed(1)),
                    torch.zeros(4, 2), torch.ones(4, 2)):
        neg_t, neg_i, ids_all = hard_negatives(img, txt, ids, scale, uniform=uniform)
        same = caption_hash(ids)[:, None] == caption_hash(ids_all)[None, :]
        rows = torch.arange(4)
        assert not same[rows, neg_t].any() and not same[rows, neg_i].any(), uniform


def test_hard_negatives_follow_the_similarities():
    """One caption far more similar to images 0-2 than the rest: drawn for every uniform."""
    ids = torch.arange(4)[:, None].repeat(1, 3) + 10
    eye = torch.eye(8)
    img = torch.stack([eye[0], eye[0], eye[0], eye[7]])
    txt = torch.stack([eye[1], eye[2], eye[4], eye[0]])
    u = torch.linspace(0.01, 0.99, 4)[:, None].repeat(1, 2)
    neg_t, _, _ = hard_negatives(img, txt, ids, torch.tensor(50.0), uniform=u)
    assert neg_t[:3].eq(3).all()
    flat, _, _ = hard_negatives(img, txt * 0, ids, torch.tensor(1.0), uniform=u)
    assert len(set(flat.tolist())) > 1  # equal similarities: the uniforms spread the draws


def test_hard_negative_draws_do_not_depend_on_the_batch_order():
    """Another layout orders the global batch differently: each sample must still draw the same negative
    (as a sample, not a position), which makes ITM exact across (dp, tp) changes and resumes."""
    gen = torch.Generator().manual_seed(5)
    n = 12
    img, txt = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    ids = torch.arange(n)[:, None].repeat(1, 4) + 10
    u = torch.rand(n, 2, generator=gen)
    scale = torch.tensor(3.0)
    neg_t, neg_i, _ = hard_negatives(img, txt, ids, scale, uniform=u)
    perm = torch.randperm(n, generator=gen)
    p_t, p_i, _ = hard_negatives(img[perm], txt[perm], ids[perm], scale, uniform=u[perm])
    assert torch.equal(perm[p_t], neg_t[perm]) and torch.equal(perm[p_i], neg_i[perm])
    assert len(set(neg_t.tolist())) > 2  # a draw, not one column for everyone


def test_hard_warmup_ramps_from_uniform_to_hard_negatives():
    """`objectives.itm.hard_warmup_steps`: the draw's scale is the logit scale times step / N (capped at 1;
    eval always hard). At step 0 the similarities play no part: other features, same draws."""
    obj = objectives(itm=1.0)
    obj.itm.hard_warmup_steps = 10
    model = build(model_cfg(1), obj)
    for step, h in ((0, 0.0), (5, 0.5), (10, 1.0), (40, 1.0)):
        model.set_itm_hardness(step)
        assert model.itm_hardness == h
    off = build(model_cfg(1), objectives(itm=1.0))
    off.set_itm_hardness(0)
    assert off.itm_hardness == 1.0  # 0 steps of warm-up: hard from the first step, as before
    gen = torch.Generator().manual_seed(3)
    ids = torch.arange(8)[:, None].repeat(1, 3) + 10
    u = torch.rand(8, 2, generator=gen)
    a = hard_negatives(torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen), ids,
                       torch.tensor(14.0) * 0.0, uniform=u)
    b = hard_negatives(torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen), ids,
                       torch.tensor(14.0) * 0.0, uniform=u)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    model.set_itm_hardness(0)
    out_train = model(batch())  # trains at hardness 0 without error
    assert torch.isfinite(out_train["loss_itm"])


def test_swap_words_reorders_two_different_content_words_and_nothing_else():
    ids = torch.tensor([[BOS, 10, 11, 12, 13, EOS, PAD, PAD],   # four different words
                        [BOS, 20, 20, EOS, PAD, PAD, PAD, PAD],  # the same word twice: nothing to swap
                        [BOS, 30, EOS, PAD, PAD, PAD, PAD, PAD],  # one word
                        [BOS, 40, 40, 41, EOS, PAD, PAD, PAD]])  # swaps must move 41
    eos = (ids == EOS).int().argmax(dim=-1)
    u = torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    out, valid = swap_words(ids, eos, u)
    assert valid.tolist() == [True, False, False, True]
    for r in (0, 3):
        changed = (out[r] != ids[r]).nonzero().flatten().tolist()
        assert len(changed) == 2 and all(1 <= c < eos[r] for c in changed)  # inside BOS..EOS
        assert sorted(out[r].tolist()) == sorted(ids[r].tolist())  # the same words
    assert torch.equal(out[1:3], ids[1:3])
    # the draw is the sample's own (same uniforms, same swap, whatever the row order); others vary
    perm = torch.tensor([3, 1, 2, 0])
    out_p, _ = swap_words(ids[perm], eos[perm], u[perm])
    assert torch.equal(out_p, out[perm])
    many = torch.tensor([[BOS, *range(10, 16), EOS]]).repeat(40, 1)
    u40 = torch.rand(40, 2, generator=torch.Generator().manual_seed(1))
    draws, _ = swap_words(many, torch.full((40,), 7), u40)
    assert len({tuple(r.tolist()) for r in draws}) > 5
    fixed, _ = swap_words(many[:2], torch.full((2,), 7))  # eval: no uniforms, one fixed swap per caption
    assert torch.equal(fixed[0], fixed[1]) and not torch.equal(fixed[0], many[0])


def test_swap_negatives_add_a_scored_pair_per_caption():
    obj = objectives(itm=1.0, mim=0.0, mlm=0.0)
    plain = build(model_cfg(1), obj)
    obj_swap = objectives(itm=1.0, mim=0.0, mlm=0.0)
    obj_swap.itm.swap_negatives = True
    swap = build(model_cfg(1), obj_swap)
    seen = []
    swap.match_logits = (lambda f: lambda t, i, im: seen.append(i) or f(t, i, im))(swap.match_logits)
    out, grads = run(swap, batch())
    (ids4,) = seen
    b = batch()["text"]
    assert ids4.shape[0] == 4 * B and torch.equal(ids4[:B], b) and torch.equal(ids4[2 * B:3 * B], b)
    swapped = ids4[3 * B:]
    assert all(sorted(x.tolist()) == sorted(y.tolist()) for x, y in zip(swapped, b))  # same words
    assert (swapped != b).any(dim=-1).all()  # every random caption here has words to swap
    assert torch.isfinite(out["loss_itm"])
    assert not torch.equal(out["loss_itm"], run(plain, batch())[0]["loss_itm"])
    assert grads["itm_head.fc.weight"].abs().sum() > 0


def test_caption_negatives_score_the_given_caption_or_a_batch_negative():
    obj = objectives(itm=1.0, mim=0.0, mlm=0.0)
    obj.itm.caption_negatives = True
    model = build(model_cfg(1), obj)
    seen = []
    model.match_logits = (lambda f: lambda t, i, im: seen.append(i) or f(t, i, im))(model.match_logits)
    b = batch()
    neg = batch(seed=1)["text"]
    has = torch.tensor([True, False, True, True, False, True])
    out, grads = run(model, {**b, "neg_text": neg, "has_negative": has})
    ids4 = seen[-1]
    assert ids4.shape[0] == 4 * B and torch.equal(ids4[:B], b["text"])
    given = ids4[3 * B:]
    assert torch.equal(given[has], neg[has])  # the data's negative where there is one
    assert torch.equal(given[~has], ids4[B:2 * B][~has])  # else the mined batch negative
    assert torch.isfinite(out["loss_itm"]) and grads["itm_head.fc.weight"].abs().sum() > 0
    run(model, b)  # a batch where no sample has one: batch negatives in all B extra pairs
    assert seen[-1].shape[0] == 4 * B and torch.equal(seen[-1][3 * B:], seen[-1][B:2 * B])


def two_line_model(**itm: object) -> tuple:
    """A fusion model scoring two `neg.txt` lines per step (plus `itm` settings), the caption ids of every
    match_logits call it makes (`seen`), a batch, its two lines and which samples have them."""
    obj = objectives(itm=1.0, mim=0.0, mlm=0.0)
    obj.itm.caption_negatives, obj.itm.caption_negatives_per_step = True, 2
    for key, value in itm.items():
        setattr(obj.itm, key, value)
    model = build(model_cfg(1), obj)
    seen: list[torch.Tensor] = []
    model.match_logits = (lambda f: lambda t, i, im: seen.append(i) or f(t, i, im))(model.match_logits)
    first, second = batch(seed=1)["text"], batch(seed=2)["text"]
    return model, seen, batch(), first, second, torch.tensor([True, False, True, True, False, True])


def test_several_caption_negatives_per_step_each_get_a_pair():
    """`objectives.itm.caption_negatives_per_step=2`: both lines of every sample (`neg_text`, `neg_text_more`)
    are scored, each with the batch negative where the sample has none; a batch without any still makes the
    same number of passes (every rank must, under ZeRO-3)."""
    model, seen, b, first, second, has = two_line_model()
    out, grads = run(model, {**b, "neg_text": first, "has_negative": has, "neg_text_more": second[:, None]})
    ids5 = seen[-1]
    assert ids5.shape[0] == 5 * B
    mined = ids5[B:2 * B]
    for got, line in ((ids5[3 * B:4 * B], first), (ids5[4 * B:], second)):
        assert torch.equal(got[has], line[has]) and torch.equal(got[~has], mined[~has])
    assert torch.isfinite(out["loss_itm"]) and grads["itm_head.fc.weight"].abs().sum() > 0
    run(model, b)
    assert seen[-1].shape[0] == 5 * B and torch.equal(seen[-1][4 * B:], seen[-1][B:2 * B])


def test_alone_steps_score_one_caption_negative_line_alone_then_every_negative():
    """`objectives.itm.alone_steps`: before that step ITM scores the positives and line `alone_line` only (the
    given line where the sample has one, else the mined batch negative), no batch or swap pairs; from it on,
    every pair as without the curriculum, and the hard-negative ramp starts there. Eval scores every pair."""
    model, seen, b, first, second, has = two_line_model(swap_negatives=True, hard_warmup_steps=10,
                                                        alone_steps=4, alone_line=1)
    obj = model.obj_cfg
    lines = {**b, "neg_text": first, "has_negative": has, "neg_text_more": second[:, None]}
    model.set_itm_hardness(3)
    assert model.itm_alone and model.itm_hardness == 0.0
    out, grads = run(model, lines)
    alone = seen[-1]
    assert alone.shape[0] == 2 * B and torch.equal(alone[:B], b["text"])
    assert torch.equal(alone[B:][has], second[has])  # line 1 alone: the object swap of `data synth`
    assert not torch.equal(alone[B:][~has], second[~has])  # none given: a batch negative, as always
    assert torch.isfinite(out["loss_itm"]) and grads["itm_head.fc.weight"].abs().sum() > 0
    reference = build(model_cfg(1), obj)  # the same pairs as a model with line 1 as its only line, no swaps
    reference.obj_cfg = dataclasses.replace(obj, itm=dataclasses.replace(
        obj.itm, swap_negatives=False, caption_negatives_per_step=1, alone_steps=0, alone_line=0))
    pos, neg = reference.match_logits, []
    reference.match_logits = lambda t, i, im: neg.append(i) or pos(t, i, im)
    reference.set_itm_hardness(0)  # the same draw of batch negatives (uniform) for samples without a line
    out_ref, _ = run(reference, {**b, "neg_text": second, "has_negative": has})
    idx = torch.cat([torch.arange(B), torch.arange(3 * B, 4 * B)])  # positives, then the line's pairs
    assert torch.equal(neg[-1][idx], alone)
    model.set_itm_hardness(4)
    assert not model.itm_alone and model.itm_hardness == 0.0  # the ramp starts where the curriculum ends
    model.set_itm_hardness(9)
    assert model.itm_hardness == 0.5
    run(model, lines)
    assert seen[-1].shape[0] == 6 * B  # positives, 2 batch pairs, the swap, both lines
    model.set_itm_hardness(0)
    model.eval()
    with torch.no_grad():
        model(lines)
    assert seen[-1].shape[0] == 6 * B  # eval scores every pair whatever the step


def test_skew_steps_weight_itm_pairs_toward_the_phrase_then_a_plain_mean():
    """`objectives.itm.skew_*`: before `skew_steps` every pair of a sample whose caption lacks the phrase
    (`itm_skew` False) weighs `skew_weight` in a weighted mean; from then on, and in eval, the plain mean."""
    import torch.nn.functional as F

    obj = objectives(itm=1.0, mim=0.0, mlm=0.0)
    obj.itm.skew_phrase, obj.itm.skew_steps, obj.itm.skew_weight = "left of", 5, 0.25
    model = build(model_cfg(1), obj)
    seen = []
    model.match_logits = (lambda f: lambda t, i, im: seen.append(f(t, i, im)) or seen[-1])(model.match_logits)
    skew = torch.tensor([True, False, True, True, False, False])
    b = {**batch(), "itm_skew": skew}

    def means(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
        ce = F.cross_entropy(logits.detach().float(), labels, reduction="none")
        w = torch.where(skew, 1.0, 0.25).repeat(3)
        return (ce * w).sum() / w.sum(), ce.mean()

    model.set_itm_hardness(4)
    out, _ = run(model, b)
    weighted, plain = means(seen[-1])
    torch.testing.assert_close(out["loss_itm"], weighted)
    assert not torch.allclose(weighted, plain)
    model.set_itm_hardness(5)
    out, _ = run(model, b)
    torch.testing.assert_close(out["loss_itm"], means(seen[-1])[1])
    model.set_itm_hardness(0)
    model.eval()
    with torch.no_grad():
        out = model(b)
    torch.testing.assert_close(out["loss_itm"], means(seen[-1])[1])


def test_activation_checkpointing_of_fusion_blocks_keeps_gradients():
    ref = build(model_cfg(2), objectives(itm=1.0, conditioned=True))
    out_ref, g_ref = run(ref, batch())
    ck = build(model_cfg(2), objectives(itm=1.0, conditioned=True))
    set_activation_checkpointing(ck)
    assert ck.fusion.grad_checkpointing
    out, g = run(ck, batch())
    torch.testing.assert_close(out["loss"], out_ref["loss"])
    for name, gr in g_ref.items():
        torch.testing.assert_close(g[name], gr, msg=name)


def test_tp_plan_splits_the_fusion_blocks():
    dims = tp_split_dims(build(model_cfg(1), objectives(itm=1.0)))
    assert dims["fusion.resblocks.0.cross.q.weight"] == 0
    assert dims["fusion.resblocks.0.cross.kv.weight"] == 0 and dims["fusion.resblocks.0.cross.kv.bias"] == 0
    assert dims["fusion.resblocks.0.cross.proj.weight"] == 1
    assert dims["fusion.resblocks.0.cross.proj.bias"] is None
    assert dims["fusion.resblocks.0.attn.qkv.weight"] == 0 and dims["fusion.resblocks.0.mlp.fc2.weight"] == 1
    assert dims["itm_head.fc.weight"] is None and dims["fusion.text_in.weight"] is None


@pytest.mark.parametrize("overrides, message", [
    (["objectives.itm.weight=1"], "model.fusion.layers > 0"),
    (["objectives.mlm.conditioned=true"], "model.fusion.layers > 0"),
    (["model.fusion.layers=1", "objectives.itm.weight=1", "objectives.contrastive.weight=0"],
     "objectives.contrastive.weight > 0"),
    (["model.fusion.layers=1", "model.fusion.heads=3"], "must divide the fusion width"),
    (["model.fusion.layers=1", "model.fusion.heads=2", "parallel.tp=4"], "model.fusion.heads (2)"),
    (["model.fusion.text_positions=true"], "model.fusion.text_positions=true needs model.fusion.layers > 0"),
    (["objectives.itm.caption_negatives_per_step=2"],
     "objectives.itm.caption_negatives_per_step > 1 needs objectives.itm.caption_negatives=true"),
    (["objectives.itm.caption_negatives_per_step=0"],
     "objectives.itm.caption_negatives_per_step must be >= 1"),
    (["model.fusion.layers=1", "model.fusion.heads=2", "objectives.itm.weight=1",
      "objectives.itm.alone_steps=100"],
     "objectives.itm.alone_steps > 0 needs objectives.itm.caption_negatives=true"),
    (["objectives.itm.alone_steps=-1"], "objectives.itm.alone_steps must be >= 0"),
    (["model.fusion.layers=1", "model.fusion.heads=2", "objectives.itm.weight=1",
      "objectives.itm.skew_steps=9"],
     "objectives.itm.skew_steps > 0 needs objectives.itm.skew_phrase"),
    (["objectives.itm.skew_weight=-0.5"], "objectives.itm.skew_weight must be >= 0, got -0.5"),
    (["objectives.itm.caption_negatives=true", "objectives.itm.alone_line=1"],
     "objectives.itm.alone_line (1) must be one of the 1 lines scored per step"),
    (["model.fusion.image_positions=true"],
     "model.fusion.image_positions=true needs model.fusion.layers > 0"),
])
def test_config_refuses_fusion_settings_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_config_accepts_fusion_and_keeps_it_off_by_default():
    assert load_config(None, []).model.fusion.layers == 0
    cfg = load_config(None, ["model.fusion.layers=2", "objectives.itm.weight=1",
                             "objectives.mlm.conditioned=true"])
    assert dataclasses.asdict(cfg.model.fusion)["layers"] == 2 and cfg.objectives.itm.weight == 1


def test_plan_counts_the_fusion_passes():
    from pretrain.plan.memory import memory_plan

    def parts(*overrides: str) -> dict:
        cfg = load_config(None, ["train.micro_batch=8", *overrides])
        return memory_plan(cfg, 2)["activations"]["per_sample_parts"]["no_checkpointing"]

    assert "fusion" not in parts()
    itm = parts("model.fusion.layers=2", "objectives.itm.weight=1")["fusion"]
    both = parts("model.fusion.layers=2", "objectives.itm.weight=1", "objectives.mlm.conditioned=true")
    assert 0 < itm < both["fusion"]


def test_a_bf16_model_uses_the_logit_scale_exponentiated_in_fp32():
    """Under bf16 the parameter is bf16; the scale the loss uses must not be rounded to bf16 again by exp."""
    model = build(model_cfg(0), objectives(mim=0.0, mlm=0.0)).to(torch.bfloat16)
    b = batch()
    b["image"] = b["image"].to(torch.bfloat16)
    out = model(b)
    want = model.logit_scale.float().exp().squeeze(0)
    assert out["logit_scale"].dtype == torch.float32 and torch.equal(out["logit_scale"], want)
    assert not torch.equal(want, model.logit_scale.exp().float().squeeze(0))  # bf16 exp would differ here


def test_fusion_text_positions_make_the_encoder_see_word_order():
    """Without `model.fusion.text_positions` the fusion blocks are equivariant to a permutation of the caption
    tokens (bidirectional self-attention, no positions: order only arrives inside the text tower's states);
    with them, the same tokens in another order give other outputs. Off, no parameter is added."""
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(0)
    text, image = torch.randn(2, L, 16), torch.randn(2, N + 1, 12)
    perm = torch.randperm(L)
    for positions in (False, True):
        enc = FusionEncoder(16, 12, 16, layers=2, heads=2, context_length=L if positions else 0)
        enc.init_weights()
        assert ("text_pos" in dict(enc.named_parameters())) == positions
        out, out_perm = enc(text, image), enc(text[:, perm], image)
        assert torch.allclose(out[:, perm], out_perm, atol=1e-5) != positions
    cfg = dataclasses.replace(model_cfg(2),
                              fusion=FusionConfig(layers=2, width=16, heads=2, text_positions=True))
    model = build(cfg, objectives(itm=1.0))
    assert model.fusion.text_pos.shape == (L, 16) and tp_split_dims(model)["fusion.text_pos"] is None
    _, grads = run(model, batch())
    assert grads["fusion.text_pos"].abs().sum() > 0  # trained by the match loss


def test_fusion_image_positions_follow_the_visible_patches():
    """`model.fusion.image_positions`: without them the cross-attention is blind to where a patch is (keys and
    values permuted together give the same output); with them every token the fusion encoder sees carries
    its own patch's row -- under FLIP's masked pass too, where the tower keeps a shuffled subset -- and the
    rows are trained by the match loss. Off, no parameter is added."""
    from pretrain.models.fusion import FusionEncoder

    torch.manual_seed(0)
    text, image = torch.randn(2, L, 16), torch.randn(2, N + 1, 12)
    identity = torch.arange(N).expand(2, N)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(N)])
    for positions in (False, True):
        enc = FusionEncoder(16, 12, 16, layers=2, heads=2, image_tokens=N + 1 if positions else 0)
        enc.init_weights()
        assert ("image_pos.embedding" in dict(enc.named_parameters())) == positions
        out = enc(text, enc.place(image, identity))
        # the same patches in another order: what a position-blind encoder cannot tell from the original
        moved = enc(text, enc.place(image[:, perm], identity))
        assert torch.allclose(out, moved, atol=1e-5) != positions

    # a masked pass: the tower keeps the patches of smallest noise, in noise order, after the CLS token
    cfg = dataclasses.replace(model_cfg(2), fusion=FusionConfig(layers=2, width=16, heads=2,
                                                                image_positions=True))
    o = objectives(itm=1.0, conditioned=True, mlm=1.0)
    o.mim.shared_pass, o.mim.mask_ratio = True, 0.5
    model = build(cfg, o)
    b = batch()
    _, tokens, _, ids_restore = model.visual.forward_features(b["image"], b["patch_noise"], 0.5)
    placed = model.fusion.place(tokens, ids_restore)
    kept = torch.argsort(b["patch_noise"], dim=1, stable=True)[:, : tokens.shape[1] - 1]  # [B, N_vis]
    rows = model.fusion.image_pos.embedding
    assert torch.allclose(placed[:, 0] - tokens[:, 0], rows[0].expand(B, -1), atol=1e-6)
    assert torch.allclose(placed[:, 1:] - tokens[:, 1:], rows[1:][kept], atol=1e-6)
    assert rows.shape == (N + 1, 32) and tp_split_dims(model)["fusion.image_pos.embedding"] is None
    _, grads = run(model, b)
    assert grads["fusion.image_pos.embedding"].abs().sum() > 0
    # eval: every patch, in order
    full = model.image_tokens(b["image"])
    assert torch.allclose(full - model.visual.forward_features(b["image"])[1], rows.expand(B, -1, -1),
                          atol=1e-6)


def test_a_skew_phrase_no_caption_holds_is_reported(caplog):
    """A skew phrase none of the first batch's captions holds (a typo) is a warning naming it; otherwise the
    share goes to the log."""
    import logging

    from pretrain.train import _report_skew

    with caplog.at_level(logging.INFO):
        _report_skew(torch.tensor([False, False, False]), "left of", rank=1)
        _report_skew(torch.tensor([True, False, True]), "left of", rank=0)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'left of' is in none of the 3 captions" in warned[0].getMessage()
    assert any("in 2 of the first batch's 3 captions" in r.getMessage() for r in caplog.records)
