"""Tensor-parallel model on 2 gloo ranks vs the single-device model: identical initial weights from the same
seed, the same losses and (gathered) gradients; the MLM loss normalised over the global batch under DP;
the per-TP-rank dropout stream and its replay under activation checkpointing.

Why the comparisons hold: the model is built and initialised as the single-device model and
`pretrain.parallelize` cuts every split weight from that full tensor; megatron's column/row layers compute
the same sums in a different order (hence tolerances, not equality, after the first matmul), and gradients
of split weights are the slices of the full gradients while replicated ones are identical on every TP rank.

The multi-process and end-to-end tests; the fast single-process ones are in tests/unit/test_tp_model.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel import groups
from pretrain.config import (
    DecoderConfig,
    FusionConfig,
    ModelConfig,
    ObjectivesConfig,
    TextConfig,
    VisionConfig,
)
from pretrain.models import PretrainModel
from pretrain.parallelize import apply_tensor_parallel, tp_split_dims

PAD, BOS, MASK, EOS = 0, 1, 2, 3
B, S, P, L, V = 8, 16, 4, 8, 60
N = (S // P) ** 2
WORLD = 2


def tiny_cfg(fusion: bool = False) -> ModelConfig:
    return ModelConfig(image_size=S, embed_dim=24, vocab_pad_multiple=64,
                       vision=VisionConfig(patch_size=P, width=32, layers=2, heads=4),
                       text=TextConfig(width=32, layers=2, heads=4, context_length=L),
                       decoder=DecoderConfig(width=16, layers=1, heads=2),
                       fusion=FusionConfig(layers=2 if fusion else 0, width=16, heads=2,
                                           text_positions=fusion, image_positions=fusion))


def objectives(fusion: bool = False, alone: bool = False, skew: bool = False) -> ObjectivesConfig:
    """The fusion run: ITM with hard negatives, word-swap and data-supplied caption negatives (4 pair kinds
    beyond the positives' B) and the image-conditioned MLM on, FLIP's shared masked pass (the fusion encoder
    attends to the visible patches). `alone`: in the curriculum's first steps (`objectives.itm.alone_steps`),
    where the second caption line is the only no-match pair and no tokens are gathered across ranks.
    `skew`: in `objectives.itm.skew_steps`, a loss weighted by sample (unevenly between the ranks)."""
    o = ObjectivesConfig()
    if fusion:
        o.itm.weight, o.mlm.conditioned, o.mim.shared_pass = 1.0, True, True
        o.itm.swap_negatives = o.itm.caption_negatives = True
        o.itm.caption_negatives_per_step = 2
        o.itm.alone_steps, o.itm.alone_line = (10, 1) if alone else (0, 0)
        o.itm.skew_phrase, o.itm.skew_steps = ("left of", 10) if skew else ("", 0)
    return o


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Masked tokens fall unevenly between the two halves of the batch (rows 0-3 get 3, rows 4-7 one)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=gen)
    ids[:, 0] = BOS
    for i in range(B):
        e = 4 + i % (L - 4)
        ids[i, e], ids[i, e + 1:] = EOS, PAD
    mlm_input, labels = ids.clone(), torch.full_like(ids, -100)
    for i in range(B):
        n = 3 if i < B // 2 else 1
        mlm_input[i, 1:1 + n], labels[i, 1:1 + n] = MASK, ids[i, 1:1 + n]
    neg = ids.flip(0)  # another row's caption as the sample's negative; rows 2 and 5 have none
    has = torch.tensor([i not in (2, 5) for i in range(B)])
    return {"image": torch.randn(B, 3, S, S, generator=gen), "text": ids, "mlm_input": mlm_input,
            "mlm_labels": labels, "patch_noise": torch.rand(B, N, generator=gen),
            "itm_noise": torch.rand(B, 2, generator=gen), "neg_text": neg, "has_negative": has,
            "neg_text_more": ids.roll(1, 0)[:, None],  # a second line each (caption_negatives_per_step=2)
            "itm_skew": torch.tensor([True, True, True, False, False, True, False, False])}  # 3 : 1 rows


def build(seed: int = 0, fusion: bool = False, alone: bool = False, skew: bool = False) -> PretrainModel:
    torch.manual_seed(seed)
    model = PretrainModel(tiny_cfg(fusion), objectives(fusion, alone, skew), vocab_size=V, pad_id=PAD,
                          eos_id=EOS).train()
    model.set_itm_hardness(0)  # step 0, as the training loop sets it
    apply_tensor_parallel(model)  # the first step of `pretrain.parallelize`; a no-op at tp = 1
    return model


KINDS = {"plain": {}, "fusion": {"fusion": True}, "alone": {"fusion": True, "alone": True},
         "skew": {"fusion": True, "skew": True}}
"""The models compared: no fusion; fusion with every ITM pair; fusion in `objectives.itm.alone_steps`; in
`objectives.itm.skew_steps`."""


def step(model: PretrainModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(batch)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}


def gather_full(model: PretrainModel, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as the full single-device tensor, TP slices concatenated."""
    full = {}
    dims = tp_split_dims(model)
    for name, p in model.named_parameters():
        t = (p.grad if grads else p.data).contiguous()
        dim = dims[name]
        if dim is not None and groups.tp_size() > 1:
            parts = [torch.empty_like(t) for _ in range(groups.tp_size())]
            dist.all_gather(parts, t, group=groups.get_tensor_parallel_group())
            t = torch.cat(parts, dim=dim)
        full[name] = t.clone()
    return full


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Summation order differs between layouts: compare elementwise against the tensor's own scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for kind in KINDS:
            results[kind] = _layouts(rank, kind)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _layouts(rank: int, kind: str) -> dict:
    batch, fusion = make_batch(), kind != "plain"
    # phase 1: tp=2, dp=1 -- both ranks see the whole batch
    groups.init_model_parallel(2)
    model = build(**KINDS[kind])
    local = {n: (tuple(p.shape), getattr(p, "tensor_model_parallel", False))
             for n, p in model.named_parameters()}
    init = gather_full(model, grads=False)
    out = step(model, batch)
    tp_result = {"init": init, "out": out, "grads": gather_full(model, grads=True), "local": local}
    groups.destroy_model_parallel()
    # phase 2: tp=1, dp=2 -- each rank its half of the batch (uneven MLM token counts; with fusion, ITM
    # negatives drawn from the whole batch, so some of a rank's negatives live on the other rank)
    groups.init_model_parallel(1)
    half = {k: v[rank * B // 2:(rank + 1) * B // 2] for k, v in batch.items()}
    model = build(**KINDS[kind])
    out = step(model, half)
    losses = torch.stack([out[k] for k in loss_keys(fusion)])
    dist.all_reduce(losses)
    losses /= WORLD  # what the trainer logs: the mean over DP ranks
    dp_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in dp_grads.values():
        dist.all_reduce(g)
        g /= WORLD  # what DeepSpeed applies: the mean over DP ranks
    groups.destroy_model_parallel()
    return {"tp": tp_result, "dp": {"losses": losses, "grads": dp_grads}}


def loss_keys(fusion: bool) -> tuple[str, ...]:
    keys = ("loss", "loss_contrastive", "loss_mim", "loss_mlm")
    return keys + ("loss_itm",) if fusion else keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_model")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    saved = [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    refs = {}
    for kind, how in KINDS.items():
        ref_model = build(**how)
        ref_init = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        ref_out = step(ref_model, make_batch())
        ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
        refs[kind] = {"init": ref_init, "out": ref_out, "grads": ref_grads}
    return saved, refs


def _pick(runs, kind: str):
    saved, refs = runs
    return [r[kind] for r in saved], refs[kind]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_tp2_starts_from_the_single_device_weights(runs, kind):
    ranks, ref = _pick(runs, kind)
    local = ranks[0]["tp"]["local"]
    for name, full in ref["init"].items():
        for r in ranks:
            assert torch.equal(r["tp"]["init"][name], full), name  # bit-identical, on both TP ranks
        shape, is_tp = local[name]
        split = [d for d in range(full.ndim) if shape[d] != full.shape[d]]
        if is_tp:  # megatron's attribute (DeepSpeed's grad norm) agrees with the actual split
            assert len(split) == 1 and shape[split[0]] * 2 == full.shape[split[0]], name
        else:
            assert shape == tuple(full.shape), name
    sharded = {n for n, (_, is_tp) in local.items() if is_tp}
    for frag in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                 "token_embedding.weight", "mlm_head.decoder.weight"):
        assert any(frag in n for n in sharded), frag
    for frag in ("attn.proj.bias", "mlp.fc2.bias", "ln_1.weight", "logit_scale", "conv1.weight"):
        assert not any(frag in n for n in sharded), frag
    if kind != "plain":
        for frag in ("fusion.resblocks.1.cross.q.weight", "fusion.resblocks.1.cross.kv.weight",
                     "fusion.resblocks.1.cross.proj.weight", "fusion.resblocks.0.attn.qkv.weight",
                     "fusion.resblocks.0.mlp.fc1.weight"):
            assert frag in sharded, frag
        for frag in ("fusion.resblocks.1.cross.proj.bias", "itm_head.fc.weight", "fusion.text_in.weight"):
            assert frag not in sharded, frag


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_tp2_losses_and_gradients_match_single_device(runs, kind):
    ranks, ref = _pick(runs, kind)
    for key in loss_keys(kind != "plain"):
        for r in ranks:
            torch.testing.assert_close(r["tp"]["out"][key], ref["out"][key], rtol=1e-5, atol=1e-6)
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        for r in ranks:
            assert_grad_close(r["tp"]["grads"][name], g, name)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_dp2_mean_of_rank_losses_is_the_global_batch_loss(runs, kind):
    """MLM tokens are split 12/4 between the two ranks: a per-rank mean would weight them 1:3. With
    fusion: ITM negatives are drawn over the global batch, so the same pairs as one process, and the
    gradient of a negative used on the other rank reaches its owner's towers."""
    ranks, ref = _pick(runs, kind)
    for i, key in enumerate(loss_keys(kind != "plain")):
        torch.testing.assert_close(ranks[0]["dp"]["losses"][i], ref["out"][key], rtol=1e-5, atol=1e-6)
    for name, g in ref["grads"].items():
        assert_grad_close(ranks[0]["dp"]["grads"][name], g, name)


# ------------------------------------------------------------------------------------ dropout RNG


