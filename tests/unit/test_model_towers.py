"""Towers, decoder and transformer internals: shapes, MAE masking, causal vs bidirectional text,
EOS pooling, the fused QKV layout, activation checkpointing and deterministic init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parallel.groups as groups
import pretrain.models.transformer as transformer_mod
from pretrain.config import DecoderConfig, ModelConfig, ObjectivesConfig, TextConfig, VisionConfig
from pretrain.models import MAEDecoder, MLMHead, PretrainModel, TextTower, VisionTower, random_masking
from pretrain.models.transformer import Attention, fused_qkv_to_stacked, layer_norm, stacked_to_fused_qkv
from pretrain.models.vision import spread_noise
from pretrain.parallelize import apply_tensor_parallel, set_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, MASK, EOS = 0, 1, 2, 3
B, S, P, L = 4, 16, 4, 8  # batch, image side, patch, context length -> N = 16 patches
N = (S // P) ** 2


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig(image_size=S, embed_dim=24, vocab_pad_multiple=64,
                       vision=VisionConfig(patch_size=P, width=32, layers=2, heads=4),
                       text=TextConfig(width=32, layers=2, heads=4, context_length=L),
                       decoder=DecoderConfig(width=16, layers=1, heads=2), **kw)


def vision(**kw) -> VisionTower:
    return VisionTower(S, P, width=32, layers=2, heads=4, embed_dim=24, **kw).eval()


def text(**kw) -> TextTower:
    return TextTower(64, L, width=32, layers=2, heads=4, embed_dim=24, eos_id=EOS, pad_id=PAD, **kw).eval()


def captions(gen: torch.Generator, eos_at: list[int]) -> torch.Tensor:
    """[len(eos_at), L]: BOS, random words, EOS at the given position, PAD after it."""
    ids = torch.randint(4, 64, (len(eos_at), L), generator=gen)
    ids[:, 0] = BOS
    for b, e in enumerate(eos_at):
        ids[b, e] = EOS
        ids[b, e + 1:] = PAD
    return ids


# ------------------------------------------------------------------------------------------- shapes
def test_shapes_of_every_part():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images, noise = torch.randn(B, 3, S, S, generator=gen), torch.rand(B, N, generator=gen)
    vis = vision()
    pooled, tokens, mask, ids_restore = vis.forward_features(images, noise, mask_ratio=0.75)
    assert pooled.shape == (B, 24) and tokens.shape == (B, 1 + 4, 32)
    assert mask.shape == (B, N) and ids_restore.shape == (B, N)
    pooled, tokens, mask, ids_restore = vis.forward_features(images)  # eval: every patch
    assert tokens.shape == (B, 1 + N, 32) and mask.sum() == 0
    assert torch.equal(ids_restore, torch.arange(N).expand(B, N))
    assert torch.equal(vis(images), pooled)

    ids = captions(gen, [3, 5, 7, 2])
    txt = text()
    assert txt(ids).shape == (B, 24)
    assert txt.forward_tokens(ids).shape == (B, L, 32)
    assert txt.forward_tokens(ids[:, :5]).shape == (B, 5, 32)  # shorter than the context is fine
    with pytest.raises(ValueError, match="context length"):
        txt(torch.cat([ids, ids], dim=1))

    dec = MAEDecoder(grid_size=S // P, patch_size=P, in_width=32, width=16, layers=1, heads=2)
    assert dec(tokens[:, :1 + 8], ids_restore).shape == (B, N, P * P * 3)
    assert MLMHead(32, 64)(torch.randn(B, L, 32)).shape == (B, L, 64)

    model = PretrainModel(tiny_model_cfg(), ObjectivesConfig(), vocab_size=60)
    assert model.vocab_size == 64 and model.text.token_embedding.num_embeddings == 64
    assert model.mlm_head.decoder.out_features == 64
    assert model.encode_image(images).shape == (B, 24)
    assert torch.allclose(model.encode_text(ids).norm(dim=-1), torch.ones(B))


def test_model_is_plain_and_tensor_parallel_needs_groups(monkeypatch):
    model = PretrainModel(tiny_model_cfg(), ObjectivesConfig(), vocab_size=60)
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_tensor_parallel(model) == 0  # tp = 1: nothing swapped
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert type(model.visual.transformer.resblocks[0].attn.qkv) is nn.Linear
    assert isinstance(layer_norm(8), nn.LayerNorm)
    monkeypatch.setitem(groups._STATE, "tp", 2)  # tp=2 without process groups (tests/test_tp_* has them)
    with pytest.raises(RuntimeError, match="process groups"):
        apply_tensor_parallel(model)


# -------------------------------------------------------------------------------------- MAE masking
@pytest.mark.parametrize("n,ratio", [(16, 0.5), (16, 0.75), (16, 0.25), (10, 0.7), (49, 0.9)])
def test_random_masking_keeps_round_n_and_restore_inverts(n, ratio):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 5, generator=gen)
    noise = torch.rand(3, n, generator=gen)
    x_vis, mask, ids_restore = random_masking(x, noise, ratio)
    keep = round(n * (1 - ratio))
    assert x_vis.shape == (3, keep, 5)
    assert torch.equal(mask.sum(dim=1), torch.full((3,), float(n - keep)))
    # the kept patches are the `keep` smallest-noise ones
    smallest = noise.topk(keep, dim=1, largest=False).indices
    for b in range(3):
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(smallest[b].tolist())
    # ids_restore is a permutation mapping each patch to its slot in [visible..., masked...] order
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(n).expand(3, n))
    visible = ids_restore < keep
    assert torch.equal(visible, mask == 0)
    for b in range(3):
        for i in range(n):
            if visible[b, i]:
                assert torch.equal(x_vis[b, ids_restore[b, i]], x[b, i])
    # deterministic: a function of the noise only
    again = random_masking(x, noise, ratio)
    assert torch.equal(again[0], x_vis) and torch.equal(again[2], ids_restore)


@pytest.mark.parametrize("grid,ratio,kept", [(4, 0.5, 2), (8, 0.5, 2), (8, 0.75, 1), (8, 0.25, 3)])
def test_spread_layout_keeps_every_2x2_block_its_share(grid, ratio, kept):
    gen = torch.Generator().manual_seed(grid)
    noise = torch.rand(5, grid * grid, generator=gen)
    _, mask, _ = random_masking(torch.zeros(5, grid * grid, 1), spread_noise(noise, grid), ratio)
    blocks = (1 - mask).view(5, grid // 2, 2, grid // 2, 2).sum(dim=(2, 4))  # kept patches per block
    assert torch.equal(blocks, torch.full_like(blocks, kept))
    _, plain, _ = random_masking(torch.zeros(5, grid * grid, 1), noise, ratio)
    assert not torch.equal(plain, mask)  # the uniform draw does not keep the blocks even
    # within a block the draw's own order decides which patches stay
    for b in range(5):
        for r in range(0, grid, 2):
            for c in range(0, grid, 2):
                idx = [r * grid + c, r * grid + c + 1, (r + 1) * grid + c, (r + 1) * grid + c + 1]
                kept_idx = sorted(idx, key=lambda i: noise[b, i].item())[:kept]
                assert all(mask[b, i] == 0 for i in kept_idx)


def _patch_slice(i: int) -> tuple[slice, slice]:
    g = S // P
    r, c = divmod(i, g)
    return slice(r * P, (r + 1) * P), slice(c * P, (c + 1) * P)


def test_encoder_only_sees_visible_patches():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    vis = vision()
    images, noise = torch.randn(2, 3, S, S, generator=gen), torch.rand(2, N, generator=gen)
    with torch.no_grad():
        pooled, _, mask, _ = vis.forward_features(images, noise, 0.5)
        masked_i = int(torch.nonzero(mask[0]).flatten()[0])
        visible_i = int(torch.nonzero(mask[0] == 0).flatten()[0])

        edited = images.clone()
        rows, cols = _patch_slice(masked_i)
        edited[0, :, rows, cols] += 5.0
        assert torch.equal(vis.forward_features(edited, noise, 0.5)[0], pooled)
        assert not torch.allclose(vis.forward_features(edited)[0][0], vis.forward_features(images)[0][0])

        edited = images.clone()
        rows, cols = _patch_slice(visible_i)
        edited[0, :, rows, cols] += 5.0
        changed = vis.forward_features(edited, noise, 0.5)[0]
        assert not torch.allclose(changed[0], pooled[0]) and torch.equal(changed[1], pooled[1])

    with pytest.raises(ValueError, match="noise"):
        vis.forward_features(images, None, 0.5)


def test_masked_encoder_matches_reference_with_positions_added_before_masking():
    """Each visible patch keeps ITS position embedding (added before the shuffle), not its slot's."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    vis = vision()
    images, noise = torch.randn(2, 3, S, S, generator=gen), torch.rand(2, N, generator=gen)
    with torch.no_grad():
        x = vis.conv1(images).flatten(2).transpose(1, 2) + vis.positional_embedding[1:]  # [2, N, W]
        keep = noise.argsort(dim=1)[:, :N // 2]
        x = torch.stack([x[b, keep[b]] for b in range(2)])  # [2, N/2, W]
        cls = (vis.class_embedding + vis.positional_embedding[0]).expand(2, 1, -1)
        x = vis.ln_post(vis.transformer(vis.ln_pre(torch.cat([cls, x], dim=1))))
        pooled, tokens, _, _ = vis.forward_features(images, noise, 0.5)
    torch.testing.assert_close(tokens, x)
    torch.testing.assert_close(pooled, x[:, 0] @ vis.proj)


def test_decoder_puts_tokens_back_in_patch_order():
    """With the transformer bypassed and an identity embed, output i must come from visible token i's
    slot (or the mask token when i is masked) plus position i: a wrong un-shuffle breaks this."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    dec = MAEDecoder(grid_size=S // P, patch_size=P, in_width=16, width=16, layers=1, heads=2).eval()
    dec.transformer = nn.Identity()
    with torch.no_grad():
        dec.decoder_embed.weight.copy_(torch.eye(16))
        dec.decoder_embed.bias.zero_()
    x_full = torch.randn(2, N, 16, generator=gen)
    noise = torch.rand(2, N, generator=gen)
    x_vis, mask, ids_restore = random_masking(x_full, noise, 0.5)
    cls = torch.randn(2, 1, 16, generator=gen)
    out = dec(torch.cat([cls, x_vis], dim=1), ids_restore)
    pos = dec.decoder_pos_embed[0, 1:]
    expect_in = torch.where(mask[..., None].bool(), dec.mask_token.expand(2, N, 16), x_full) + pos
    expect = dec.decoder_pred(dec.decoder_norm(expect_in))
    torch.testing.assert_close(out, expect)


def test_decoder_positions_are_fixed_sincos():
    dec = MAEDecoder(grid_size=4, patch_size=P, in_width=32, width=16, layers=1, heads=2)
    pos = dec.decoder_pos_embed[0]
    assert pos.shape == (1 + 16, 16) and not pos.requires_grad
    assert "decoder_pos_embed" not in dec.state_dict()
    assert torch.equal(pos[0], torch.zeros(16))
    # patch (r, c) = index r*4 + c: column in the first half of the channels (sin then cos), row second
    r, c = 2, 3
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    ref = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
    torch.testing.assert_close(pos[1 + r * 4 + c], ref.float())


# --------------------------------------------------------------------------------------------- text
def test_causal_pass_ignores_later_tokens_bidirectional_does_not():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    txt = text()
    ids = captions(gen, [7, 7])
    edited = ids.clone()
    t = 4
    edited[:, t] = (ids[:, t] + 1 - 4) % 60 + 4  # another word
    with torch.no_grad():
        a, b = txt.forward_tokens(ids, causal=True), txt.forward_tokens(edited, causal=True)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t:], b[:, t:])
        a, b = txt.forward_tokens(ids, causal=False), txt.forward_tokens(edited, causal=False)
        assert not torch.allclose(a[:, :t], b[:, :t])


def test_bidirectional_pass_masks_padding_keys():
    """Real tokens' states must not depend on trailing padding: same caption with 2 or 0 PADs."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    txt = text()
    ids = captions(gen, [5, 5])  # positions 6 and 7 are PAD
    with torch.no_grad():
        padded = txt.forward_tokens(ids, causal=False)[:, :6]
        short = txt.forward_tokens(ids[:, :6], causal=False)
        torch.testing.assert_close(padded, short, rtol=0, atol=1e-5)
        # ...whereas without the mask the padding keys would be attended to
        unmasked = txt.forward_tokens(ids, causal=False, pad_id=-1)[:, :6]
        assert not torch.allclose(unmasked, short, atol=1e-4)
        # an all-padding row (nothing to attend to) attends everywhere rather than producing NaN/zeros
        all_pad = torch.full((1, L), PAD)
        out = txt.forward_tokens(all_pad, causal=False)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, txt.forward_tokens(all_pad, causal=False, pad_id=-1))


def test_eos_pooling_picks_first_eos_position():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    txt = text()
    ids = captions(gen, [2, 4, 7, 5])
    ids[3, 6] = EOS  # a second EOS: the first one (5) counts
    no_eos = ids[1].clone()
    no_eos[4] = 9  # EOS overwritten: falls back to the last non-pad token (4)
    ids = torch.cat([ids, no_eos[None]])
    with torch.no_grad():
        hidden = txt.forward_tokens(ids, causal=True)
        pooled = txt(ids)
    for b, pos in enumerate([2, 4, 7, 5, 4]):
        torch.testing.assert_close(pooled[b], hidden[b, pos] @ txt.text_projection)
    assert torch.equal(txt.pool_positions(ids), torch.tensor([2, 4, 7, 5, 4]))
    # tokens after EOS (the padding) cannot change a causal embedding
    tail = ids.clone()
    tail[0, 3:] = 17
    with torch.no_grad():
        torch.testing.assert_close(txt(tail)[0], pooled[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- QKV layout
def test_fused_qkv_layout_is_heads_3_headdim():
    """Rows of `qkv.weight` are [heads, 3, head_dim]: slicing head h's 3*D rows gives its q, k, v.
    A contiguous split of the rows over 2 TP ranks therefore gives each rank whole heads."""
    torch.manual_seed(0)
    W, H = 16, 4
    D = W // H
    attn = Attention(W, H).eval()
    x = torch.randn(2, 5, W)
    for causal in (False, True):
        heads = []
        for h in range(H):
            rows = slice(h * 3 * D, (h + 1) * 3 * D)
            w, bias = attn.qkv.weight[rows], attn.qkv.bias[rows]
            q, k, v = (x @ w[i * D:(i + 1) * D].T + bias[i * D:(i + 1) * D] for i in range(3))
            scores = q @ k.transpose(1, 2) / math.sqrt(D)  # [2, 5, 5]
            if causal:
                scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        ref = attn.proj(torch.cat(heads, dim=-1))
        with torch.no_grad():
            torch.testing.assert_close(attn(x, causal=causal), ref)

    # exporters: the stacked [3, heads, head_dim] form is what nn.MultiheadAttention / HF / open_clip use
    mha = nn.MultiheadAttention(W, H, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(fused_qkv_to_stacked(attn.qkv.weight, H))
        mha.in_proj_bias.copy_(fused_qkv_to_stacked(attn.qkv.bias, H))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], attn(x))
    assert torch.equal(stacked_to_fused_qkv(fused_qkv_to_stacked(attn.qkv.weight, H), H), attn.qkv.weight)
    assert not torch.equal(fused_qkv_to_stacked(attn.qkv.weight, H), attn.qkv.weight)


# ---------------------------------------------------------------------------- checkpointing / init
def _batch(gen: torch.Generator, b: int = B) -> dict[str, torch.Tensor]:
    ids = captions(gen, [min(7, 3 + i) for i in range(b)])
    mlm_input, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_input[:, 1], labels[:, 1] = MASK, ids[:, 1]
    return {"image": torch.randn(b, 3, S, S, generator=gen), "text": ids, "mlm_input": mlm_input,
            "mlm_labels": labels, "patch_noise": torch.rand(b, N, generator=gen)}


def test_activation_checkpointing_same_loss_and_grads(monkeypatch):
    calls = []
    real = transformer_mod.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer_mod, "checkpoint", counting)
    torch.manual_seed(0)
    batch = _batch(torch.Generator().manual_seed(6))
    shared = ObjectivesConfig()
    shared.mim.shared_pass = True  # one vision pass, so the block count below is simple
    plain = PretrainModel(tiny_model_cfg(), shared, vocab_size=60)
    ckpt = PretrainModel(tiny_model_cfg(), shared, vocab_size=60)
    set_activation_checkpointing(ckpt)
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, ckpt):
        model.train()
        out = model(batch)
        out["loss"].backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    # 2 vision + 2 causal text + 2 bidirectional text + 1 decoder blocks, all non-reentrant
    assert calls == [False] * 7
    (out_a, grads_a), (out_b, grads_b) = results
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=0, msg=n)
    with torch.no_grad():  # eval / no-grad never recomputes
        ckpt(batch)
    assert len(calls) == 7


def test_init_weights_is_deterministic_under_manual_seed():
    torch.manual_seed(1)
    a = PretrainModel(tiny_model_cfg(), ObjectivesConfig(), vocab_size=60)
    torch.manual_seed(2)
    b = PretrainModel(tiny_model_cfg(), ObjectivesConfig(), vocab_size=60)
    assert not torch.equal(a.visual.proj, b.visual.proj)
    for m in (a, b):
        torch.manual_seed(0)
        m.init_weights()
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert math.isclose(a.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    blk = a.text.transformer.resblocks[0]
    assert torch.equal(blk.ln_1.weight, torch.ones(32)) and torch.equal(blk.attn.qkv.bias, torch.zeros(96))
    # CLIP's stds: positions 0.01, tokens 0.02, QKV W^-0.5
    assert a.text.positional_embedding.std().item() == pytest.approx(0.01, rel=0.3)
    assert a.text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert blk.attn.qkv.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.2)


def test_vision_block_init_pytorch_is_the_layers_defaults():
    """`model.vision.block_init=pytorch`: what nn.MultiheadAttention / nn.Linear give (open_clip's ViT),
    the text tower untouched; "scaled" is the text tower's init."""
    W = 128  # wide enough for the empirical stds to sit near their targets
    torch.manual_seed(0)
    scaled = VisionTower(S, P, width=W, layers=2, heads=4, embed_dim=24)
    torch.manual_seed(0)
    plain = VisionTower(S, P, width=W, layers=2, heads=4, embed_dim=24, block_init="pytorch")
    a, b = scaled.transformer.resblocks[0], plain.transformer.resblocks[0]
    xavier = (2 / (W + 3 * W)) ** 0.5  # fused [3W, W] as MHA's in_proj_weight
    kaiming = (1 / (3 * W)) ** 0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert b.attn.qkv.weight.std().item() == pytest.approx(xavier, rel=0.1)
    assert a.attn.qkv.weight.std().item() == pytest.approx(W ** -0.5, rel=0.1)
    assert b.attn.proj.weight.std().item() == pytest.approx(kaiming, rel=0.1)
    assert b.mlp.fc1.weight.std().item() == pytest.approx(kaiming, rel=0.1)
    assert b.mlp.fc2.weight.std().item() == pytest.approx((1 / (3 * 4 * W)) ** 0.5, rel=0.1)
    assert torch.equal(b.attn.qkv.bias, torch.zeros(3 * W)) and torch.equal(b.attn.proj.bias, torch.zeros(W))
    assert b.mlp.fc1.bias.abs().max() > 0  # nn.Linear's uniform bias, as open_clip's c_fc
    cfg = tiny_model_cfg()
    cfg.vision.block_init = "pytorch"
    torch.manual_seed(0)
    m = PretrainModel(cfg, ObjectivesConfig(), vocab_size=60)
    assert m.visual.block_init == "pytorch" and m.visual.transformer.resblocks[0].mlp.fc1.bias.abs().max() > 0
    assert torch.equal(m.text.transformer.resblocks[0].mlp.fc1.bias, torch.zeros(128))


def test_quick_gelu_option():
    x = torch.linspace(-3, 3, 7)
    act = transformer_mod.activation("quick_gelu")
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(act(x), F.gelu(x))
    model = PretrainModel(tiny_model_cfg(activation="quick_gelu"), ObjectivesConfig(), vocab_size=60)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.act, transformer_mod.QuickGELU)
