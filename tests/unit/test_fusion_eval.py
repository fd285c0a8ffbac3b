"""ITM re-ranking (`pretrain eval --rerank K`), the attribute-binding probe and the compositional synthetic
samples, single process (the row-block split over ranks is the retrieval counts' own, tested in
tests/e2e/test_distributed_eval.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from data_pipelines.synth import make_pair_sample, write_synthetic_shards
from pretrain.evaluation.binding import read_metadata
from pretrain.evaluation.rerank import rerank_counts, rerank_metrics, top_k


class StubMatcher(nn.Module):
    """A 'fusion model' whose match score is a fixed table: score(caption i, image j) = table[i, j]. Tokens
    carry the row index, so the re-ranker's plumbing (which pair goes where) is what is tested."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.itm_head = nn.Linear(1, 1)
        self.logit_scale = nn.Parameter(torch.tensor([SCALE]).log())

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, :1, 0, 0].unsqueeze(-1)  # [b, 1, 1]: the image's index

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, :1].float().unsqueeze(-1)

    def itm_score(self, text_tok: torch.Tensor, ids: torch.Tensor, image_tok: torch.Tensor) -> torch.Tensor:
        return self.table[ids[:, 0], image_tok[:, 0, 0].long()]


SCALE = 3.0  # the stub's contrastive logit scale


def brute_force(img: torch.Tensor, txt: torch.Tensor, table: torch.Tensor, k: int) -> dict[str, int]:
    n = len(img)
    out = {"i2t": 0, "t2i": 0, "i2t_in_top_k": 0, "t2i_in_top_k": 0, "i2t_sim": 0, "t2i_sim": 0}
    for i in range(n):
        for name, sims, score in (("i2t", txt @ img[i], table[:, i]), ("t2i", img @ txt[i], table[i, :])):
            cand = sorted(range(n), key=lambda j: (-float(sims[j]), j))[:k]
            both = score + SCALE * sims  # ITM plus the contrastive logit
            if i in cand:
                out[f"{name}_in_top_k"] += 1
                out[name] += int(all(score[j] <= score[i] for j in cand))
                out[f"{name}_sim"] += int(all(both[j] <= both[i] for j in cand))
    return out


def features(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=-1)
    txt = nn.functional.normalize(img + 0.8 * torch.randn(n, 8, generator=gen), dim=-1)
    pixels = torch.arange(n).float()[:, None, None, None].expand(n, 3, 2, 2).clone()
    ids = torch.arange(n)[:, None].repeat(1, 4)
    return {"image": img, "text": txt, "ids": ids, "pixels": pixels}


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rerank_counts_equal_brute_force(k):
    n = 23
    feats = features(n, seed=k)
    table = torch.randn(n, n, generator=torch.Generator().manual_seed(100 + k))
    got = rerank_counts(StubMatcher(table), feats, k, block=5, pair_batch=4)
    assert got == brute_force(feats["image"], feats["text"], table, k)
    if k > 1:  # the two orders differ here, so each count is checked on its own
        assert got["i2t"] != got["i2t_sim"] or got["t2i"] != got["t2i_sim"]


def test_rerank_with_a_perfect_matcher_reaches_the_candidate_recall():
    n = 30
    feats = features(n, seed=3)
    m = rerank_metrics(StubMatcher(torch.eye(n) * 5), feats, 4)
    assert m["i2t_rerank_r1"] == m["i2t_rerank_candidates_recall"] > 0
    assert m["t2i_rerank_r1"] == m["t2i_rerank_candidates_recall"] > 0


def test_rerank_needs_a_fusion_checkpoint():
    with pytest.raises(ValueError, match="fusion encoder"):
        rerank_metrics(nn.Linear(1, 1), {}, 4)


def test_top_k_over_tiles_is_the_global_top_k():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(6, 5, generator=gen), torch.randn(41, 5, generator=gen)
    expect = (q @ keys.T).topk(7, dim=1).indices
    assert torch.equal(top_k(q, keys, 7, block=8), expect)


def test_pair_captions_bind_attributes_by_order_and_swaps_differ():
    for index in range(20):
        s = make_pair_sample(index, 32, seed=0)
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        a, b = meta["objects"]
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
        for swap in ("swapped_colours", "swapped_objects"):
            assert meta[swap] != caption and sorted(meta[swap].split()) == sorted(caption.split())
        left = f"{a['colour']} {a['shape']}"
        right = f"{b['colour']} {b['shape']}"
        assert (f"{left} left of" in caption and caption.endswith(right)) or \
            (f"{right} right of" in caption and caption.endswith(left))
        assert s == make_pair_sample(index, 32, seed=0)  # a pure function of its arguments


def test_negative_captions_reach_the_batch_one_line_per_epoch(tmp_path):
    """`.neg.txt` (the synthetic writer puts both swaps there) becomes `neg_text` / `has_negative`; the line
    used rotates with the epoch; samples without one fall back to their own caption, flagged False."""
    from datautil import tiny_cfg, train_loader

    from data_pipelines.decode import negative_caption_of
    from data_pipelines.tokenizer import train_tokenizer

    summary = write_synthetic_shards(tmp_path, samples=8, samples_per_shard=4, image_size=16, seed=3,
                                     compositional=True)
    meta = read_metadata(summary["urls"])
    captions = [make_pair_sample(i, 16, seed=3)["txt"].decode() for i in range(8)]
    tok = train_tokenizer(captions, vocab_size=120)
    cfg = tiny_cfg(summary["urls"], batch=4)
    cfg.model.image_size = 16
    batch = next(iter(train_loader(cfg, tok, rank=0, world=1)))
    assert batch["has_negative"].all()
    for key, row in zip(batch["_keys"], batch["neg_text"]):
        swap = meta[key]["swapped_colours"] if batch["_epochs"][0] % 2 == 0 else meta[key]["swapped_objects"]
        assert torch.equal(row, tok.encode_batch([swap], cfg.model.text.context_length)[0])
    sample = {"neg.txt": b"first\n\nsecond\n"}
    assert [negative_caption_of(sample, e) for e in range(3)] == ["first", "second", "first"]
    assert negative_caption_of({}, 0) == "" and negative_caption_of({"neg.txt": b"\xff"}, 0) == ""

    # objectives.itm.caption_negatives_per_step=2: both swaps of every sample at every step
    from data_pipelines.decode import negative_captions_of

    three = {"neg.txt": b"a\nb\nc"}
    got = [negative_captions_of(three, e, per_step=2) for e in range(3)]
    assert got == [["a", "b"], ["c", "a"], ["b", "c"]]
    cfg.objectives.itm.caption_negatives, cfg.objectives.itm.caption_negatives_per_step = True, 2
    cfg.model.fusion.layers, cfg.objectives.itm.weight = 1, 1.0
    batch = next(iter(train_loader(cfg, tok, rank=0, world=1)))
    L = cfg.model.text.context_length
    assert batch["neg_text_more"].shape == (4, 1, L)
    for key, row, more in zip(batch["_keys"], batch["neg_text"], batch["neg_text_more"][:, 0]):
        swaps = tok.encode_batch([meta[key]["swapped_colours"], meta[key]["swapped_objects"]], L)
        assert torch.equal(row, swaps[0]) and torch.equal(more, swaps[1])
    assert "itm_skew" not in batch
    # objectives.itm.skew_*: a flag per sample, True where its caption says the phrase
    cfg.objectives.itm.skew_phrase, cfg.objectives.itm.skew_steps = "left of", 10
    stream = iter(train_loader(cfg, tok, rank=0, world=1))
    by_key = {make_pair_sample(i, 16, seed=3)["__key__"]: captions[i] for i in range(8)}
    got, want = [], []
    for batch in (next(stream), next(stream)):  # the 8 samples
        got += batch["itm_skew"].tolist()
        want += [" left of " in by_key[key] for key in batch["_keys"]]
    assert got == want and 0 < sum(want) < len(want)


def test_unreadable_or_missing_negative_captions_are_counted_and_the_sample_kept(tmp_path):
    """A `neg.txt` that is not UTF-8 or holds no caption is counted as `bad_negative`; a sample without one
    is counted as `missing_negative` only when the run trains on them (`objectives.itm.caption_negatives`
    with the match loss on); either way the sample still reaches the batch, and the counts reach the
    batch's `_skips` (the run's metrics and summary) and `pretrain data inspect`."""
    from datautil import good_members, tiny_cfg, tiny_tokenizer, train_loader, write_tar

    from data_pipelines.decode import negative_caption_of
    from data_pipelines.inspection import format_report, inspect_shards
    from data_pipelines.stats import SkipCounter

    skips = SkipCounter()
    assert negative_caption_of({"__key__": "k", "neg.txt": b"\xff\xfe"}, 0, skips) == ""
    assert negative_caption_of({"__key__": "k", "neg.txt": b" \n\n"}, 0, skips) == ""
    assert negative_caption_of({"__key__": "k"}, 0, skips) == ""  # not wanted: not counted
    assert negative_caption_of({"__key__": "k"}, 0, skips, wanted=True) == ""
    assert skips.as_dict() == {"bad_negative": 2, "missing_negative": 1}

    members = good_members("s", 6)
    members.insert(2, ("s000.neg.txt", b"a blue square"))
    members.insert(5, ("s001.neg.txt", b"\xff not utf-8"))
    write_tar(tmp_path / "a.tar", members)
    cfg = tiny_cfg(str(tmp_path / "a.tar"), batch=6)
    cfg.model.fusion.layers = 1
    cfg.objectives.itm.weight = 1.0
    cfg.objectives.itm.caption_negatives = True
    batch = next(iter(train_loader(cfg, tiny_tokenizer(), rank=0, world=1)))
    assert len(batch["_keys"]) == 6 and int(batch["has_negative"].sum()) == 1
    assert batch["_skips"] == {"bad_negative": 1, "missing_negative": 4}
    cfg.objectives.itm.caption_negatives = False  # off: a missing neg.txt is nothing to report
    batch = next(iter(train_loader(cfg, tiny_tokenizer(), rank=0, world=1)))
    assert batch["_skips"] == {"bad_negative": 1}
    report = inspect_shards(str(tmp_path / "a.tar"))
    assert report["good"] == 6 and report["bad"] == {"bad_negative": 1}
    text = format_report(report)
    assert "0 would be skipped" in text and "bad_negative: 1 (sample kept)" in text


def test_compositional_shards_carry_the_probe_metadata(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=6, samples_per_shard=4, image_size=16, seed=2,
                                     compositional=True)
    meta = read_metadata(summary["urls"])
    assert len(meta) == 6 and all("swapped_colours" in m for m in meta.values())


def _relation_setup(tmp_path, conditioned: bool):
    """Compositional shards, a tokenizer trained on them and an untrained small model with the fusion
    encoder (and the conditioned MLM or not)."""
    from data_pipelines.tokenizer import train_tokenizer_from_shards
    from pretrain.config import load_config
    from pretrain.models.pretrain_model import PretrainModel

    shards = write_synthetic_shards(tmp_path, samples=40, samples_per_shard=20, image_size=16, seed=3,
                                    compositional=True)
    tok = train_tokenizer_from_shards(shards["urls"], vocab_size=128, max_samples=40)
    cfg = load_config(None, ["model.image_size=16", "model.vision.patch_size=8", "model.vision.width=32",
                             "model.vision.layers=1", "model.vision.heads=2", "model.text.width=32",
                             "model.text.layers=1", "model.text.heads=2", "model.text.context_length=16",
                             "model.embed_dim=16", "model.fusion.layers=1", "model.fusion.heads=2",
                             "objectives.itm.weight=1", "data.vocab_size=128",
                             f"objectives.mlm.conditioned={str(conditioned).lower()}"])
    torch.manual_seed(0)
    model = PretrainModel.from_config(cfg, tok).eval()
    return shards["urls"], tok, cfg, model


def test_relation_probe_masks_the_relation_word_and_scores_it_against_the_other(tmp_path):
    """`binding_relation_mlm`: each caption's "left"/"right" (one token) is masked, nothing else, and the
    conditioned MLM's logit for the true word is compared with the other's: a model that always says "left"
    scores the fraction of captions saying "left of"."""
    import tarfile

    from pretrain.evaluation.binding import binding_probe, relation_ids

    urls, tok, cfg, model = _relation_setup(tmp_path, conditioned=True)
    left, right = relation_ids(tok, 16)
    seen: list[torch.Tensor] = []
    real = model.mlm_logits

    def always_left(masked: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        seen.append(masked.clone())
        logits = real(masked, image_tokens)
        logits[..., left] = logits[..., right] + 1.0
        return logits

    model.mlm_logits = always_left
    out = binding_probe(model, tok, cfg, urls)
    captions = []
    for url in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(url) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")
                         and not m.name.endswith(".neg.txt")]
    assert len(captions) == 40 and out["binding_samples"] == 40
    assert out["binding_relation_mlm"] == pytest.approx(sum("left of" in c for c in captions) / 40)
    # both relations occur, unevenly: an inverted comparison (1 - x) would not pass
    assert 0 < out["binding_relation_mlm"] < 1 and out["binding_relation_mlm"] != 0.5
    masked = torch.cat(seen)
    true = tok.encode_batch(captions, 16)
    assert len(masked) == 40 and ((masked == tok.mask_id).sum(dim=1) == 1).all()
    at = masked == tok.mask_id
    # every masked caption is a true caption (the loader may order them otherwise) with its relation word
    # put back at the masked position
    restored = masked.clone()
    restored[at] = -1
    truth_rows = {tuple(r) for r in true.tolist()}
    for row, pos in zip(restored.tolist(), at.float().argmax(dim=1).tolist()):
        assert any(tuple(row[:pos] + [w] + row[pos + 1:]) in truth_rows for w in (left, right))

    model.mlm_logits = real  # the untrained model itself: a fraction, and no key without the conditioned MLM
    assert 0 <= binding_probe(model, tok, cfg, urls)["binding_relation_mlm"] <= 1
    urls, tok, cfg, model = _relation_setup(tmp_path / "plain", conditioned=False)
    assert "binding_relation_mlm" not in binding_probe(model, tok, cfg, urls)
