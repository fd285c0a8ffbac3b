"""Distributed evaluation's pieces in one process: the eval loader's split between ranks covers the
single-process set exactly once, in both modes; the tiled retrieval and zero-shot counts equal a brute-force
top-k; gathered rows sort back into single-process order."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.loader import make_eval_loader
from data_pipelines.synth import write_synthetic_shards
from pretrain.evaluation.distributed import (
    gather_features,
    metrics_from_features,
    retrieval_counts,
    zeroshot_counts,
)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("split")
    write_synthetic_shards(d, samples=19, samples_per_shard=8, image_size=16, seed=5)  # 8 + 8 + 3
    return str(d / "shard-{000000..000002}.tar")


def _rows(urls: str, tok, rank: int, world: int, max_samples: int = 0, workers: int = 0) -> list:
    loader = make_eval_loader(urls, tok, 16, 3, 16, (0.5,) * 3, (0.5,) * 3, workers=workers, rank=rank,
                              world=world, max_samples=max_samples)
    return [(tuple(o), k) for b in loader for o, k in zip(b["_order"].tolist(), b["_keys"])]


@pytest.mark.parametrize("world,max_samples", [(2, 0), (3, 0), (4, 0), (5, 0), (2, 11), (4, 7), (25, 0)])
def test_ranks_cover_the_single_process_set_exactly_once(uneven, tiny_tok, world, max_samples):
    single = _rows(uneven, tiny_tok, 0, 1, max_samples)
    assert len(single) == (max_samples or 19)
    assert [o for o, _ in single] == sorted(o for o, _ in single)  # one process reads in shard order
    shares = [_rows(uneven, tiny_tok, r, world, max_samples) for r in range(world)]
    union = sorted(row for share in shares for row in share)
    assert union == single  # nothing lost, nothing twice
    if world > 19:
        assert any(not s for s in shares)  # fewer samples than ranks: some ranks hold nothing


def test_workers_split_the_share_too(uneven, tiny_tok):
    single = _rows(uneven, tiny_tok, 0, 1)
    assert sorted(_rows(uneven, tiny_tok, 0, 1, workers=2)) == single
    two = _rows(uneven, tiny_tok, 1, 2, workers=2) + _rows(uneven, tiny_tok, 0, 2, workers=2)
    assert sorted(two) == single


def test_masked_batches_repeat_exactly(uneven, tiny_tok):
    def masked(rank: int, world: int) -> dict:
        loader = make_eval_loader(uneven, tiny_tok, 16, 4, 16, (0.5,) * 3, (0.5,) * 3, rank=rank, world=world,
                                  masking=(7, 0.3, 4))
        return {k: (n.tolist(), m.tolist()) for b in loader
                for k, n, m in zip(b["_keys"], b["patch_noise"], b["mlm_labels"])}
    one = masked(0, 1)
    assert one == masked(0, 1)  # fixed seed: the same masks on every call
    assert one == {**masked(0, 2), **masked(1, 2)}  # and in every layout


def _brute(img: torch.Tensor, txt: torch.Tensor, k: int) -> tuple[int, int]:
    sim = img @ txt.T
    target = torch.arange(len(img)).unsqueeze(1)
    i2t = int((sim.topk(k, dim=1).indices == target).any(dim=1).sum())
    t2i = int((sim.T.topk(k, dim=1).indices == target).any(dim=1).sum())
    return i2t, t2i


@pytest.mark.parametrize("n,block", [(10, 3), (10, 10), (37, 8), (5, 64)])
def test_tiled_recall_equals_brute_force_topk(n, block):
    g = torch.Generator().manual_seed(n)
    img = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, 6, generator=g), dim=1)
    r = retrieval_counts(img, txt, (1, 5), block)
    for k in (1, 5):
        assert (r[f"i2t_r{k}"], r[f"t2i_r{k}"]) == _brute(img, txt, min(k, n))
    assert 0 < r["i2t_r1"] < n  # the data is neither trivial nor hopeless: the test can fail


def test_zeroshot_counts_skip_unlabelled_rows():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(20, 4, generator=g), dim=1)
    cls = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    y = torch.randint(0, 7, (20,), generator=g)
    y[::4] = -1
    z = zeroshot_counts(img, y, cls, block=6)
    logits = img[y >= 0] @ cls.T
    assert z["labelled"] == 15
    assert z["top1_hits"] == int((logits.argmax(1) == y[y >= 0]).sum())
    assert z["top5_hits"] == int((logits.topk(5, 1).indices == y[y >= 0, None]).any(1).sum())


def test_gather_sorts_rows_back_into_shard_order():
    order = torch.tensor([[1, 0], [0, 2], [0, 0], [2, 1], [0, 1]])
    local = {"_order": order, "image": torch.arange(5.0).unsqueeze(1), "text": torch.zeros(5, 1),
             "cls": torch.zeros(5, dtype=torch.long)}
    out = gather_features(local)
    assert out["_order"].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 1]]
    assert out["image"].squeeze(1).tolist() == [2.0, 4.0, 1.0, 0.0, 3.0]
    assert metrics_from_features(out, None)["samples"] == 5
