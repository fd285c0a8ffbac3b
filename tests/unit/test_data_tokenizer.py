"""Caption tokenizer (BPE, fixed special ids, batch encoding) and BERT-style MLM masking."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from data_pipelines.masking import IGNORE_INDEX, mlm_mask
from data_pipelines.synth import make_sample, write_synthetic_shards
from data_pipelines.tokenizer import (
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SOS_ID,
    TextTokenizer,
    train_tokenizer,
    train_tokenizer_from_shards,
)

CAPTIONS = [make_sample(i, 8, 0)["txt"].decode() for i in range(300)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=200)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.sos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
    assert tok.special_ids == (0, 1, 2, 3, 4)
    assert len(tok.special_ids) < tok.vocab_size <= 200
    assert tok.tokenize("a large red circle") == ["a", "large", "red", "circle"]


def test_encode_batch_layout(tok):
    texts = ["a red circle", "A RED Circle,", "there is a large blue square near the top left"]
    ids = tok.encode_batch(texts, context_length=16)
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert torch.equal(ids[0, :4], ids[1, :4])  # lower-cased
    for row, text in zip(ids.tolist(), texts, strict=True):
        n = len(tok.tokenize(text))
        assert row[0] == SOS_ID and row[n + 1] == EOS_ID
        assert all(t == PAD_ID for t in row[n + 2:])
        assert all(t not in tok.special_ids for t in row[1:n + 1])
    assert tok.tokenize("circle,") == ["circle", ","]  # punctuation split from the word
    assert tok.encode_batch([], 8).shape == (0, 8)
    with pytest.raises(ValueError, match="context_length"):
        tok.encode_batch(["x"], 1)


def test_special_token_strings_in_a_caption_are_ordinary_text(tok, tmp_path):
    """A caption saying "[EOS]" must not end the text there (the tower pools at the first [EOS]), "[PAD]"
    must not be masked out as padding, "[MASK]" must not look masked; also after save/load and pickling."""
    caption = "a red [EOS] square [PAD] [MASK] [SOS] [UNK]"
    tok.save(tmp_path / "tok.json")
    for t in (tok, TextTokenizer.load(tmp_path / "tok.json"), pickle.loads(pickle.dumps(tok))):
        row = t.encode_batch([caption, "a red square"], 32)
        n = len(t.tokenize(caption))
        assert n > 7 and row[0, 0] == SOS_ID and row[0, n + 1] == EOS_ID
        assert not any(i in (PAD_ID, SOS_ID, EOS_ID, MASK_ID) for i in row[0, 1:n + 1].tolist()), row[0]
        assert torch.equal(row[1], tok.encode_batch(["a red square"], 32)[0])  # normal captions unchanged


def test_truncation_keeps_sos_and_ends_with_eos(tok):
    text = "a large red circle in the top left of the image on a grey background"
    full = tok.encode_batch([text], 32)[0]
    short = tok.encode_batch([text], 6)[0]
    assert short.tolist() == [SOS_ID, *full[1:5].tolist(), EOS_ID]
    again = tok.encode_batch([text], 32)[0]  # switching lengths back and forth is fine
    assert torch.equal(full, again)


def test_save_load_round_trip_and_errors(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert torch.equal(loaded.encode_batch(CAPTIONS[:20], 24), tok.encode_batch(CAPTIONS[:20], 24))
    clone = pickle.loads(pickle.dumps(tok))  # spawned DataLoader workers receive a pickled copy
    assert torch.equal(clone.encode_batch(CAPTIONS[:5], 24), tok.encode_batch(CAPTIONS[:5], 24))
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TextTokenizer.load(bad)
    swapped = path.read_text().replace('"[MASK]"', '"[XMASK]"')
    (tmp_path / "swapped.json").write_text(swapped)
    with pytest.raises(ValueError, match=r"\[MASK\] has id None, expected 4"):
        TextTokenizer.load(tmp_path / "swapped.json")


def test_train_rejects_empty_corpus():
    with pytest.raises(ValueError, match="zero captions"):
        train_tokenizer([], vocab_size=100)


def test_train_from_shards_skips_bad_captions(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=40, samples_per_shard=20, image_size=8, seed=0)
    extra = tmp_path / "extra.tar"
    with tarfile.open(extra, "w") as tar:
        for name, data in [("bad.txt", b"\xff\xfe\xfa"), ("empty.txt", b"  "), ("ok.txt", b"zebra zebra")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tok = train_tokenizer_from_shards(f"{summary['urls']}::{extra}", vocab_size=150, max_samples=1000)
    assert 1 not in tok.encode_batch(["zebra"], 8)[0].tolist()  # the good caption of extra.tar was read
    synth_only = train_tokenizer_from_shards(summary["urls"], vocab_size=150, max_samples=1000)
    assert 1 in synth_only.encode_batch(["zebra"], 8)[0].tolist()  # 'z' never seen: [UNK]
    only_three = train_tokenizer_from_shards(summary["urls"], vocab_size=150, max_samples=3)
    assert only_three.vocab_size < synth_only.vocab_size
    with pytest.raises(ValueError, match="no usable captions"):
        train_tokenizer_from_shards(_captionless(tmp_path), 150, 10)


def _captionless(tmp_path):
    path = tmp_path / "nocaps.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return str(path)


# ------------------------------------------------------------------------------------------ masking
def _caption_ids(rng, length=40, vocab=1000):
    ids = np.full(length, PAD_ID, dtype=np.int64)
    n = int(rng.integers(5, length - 2))
    ids[0], ids[n + 1] = SOS_ID, EOS_ID
    ids[1:n + 1] = rng.integers(5, vocab, size=n)
    return ids


def test_mlm_mask_statistics():
    rng = np.random.default_rng(0)
    vocab, specials = 1000, (0, 1, 2, 3, 4)
    selected = maskable = masked = randomised = kept = 0
    for _ in range(3000):
        ids = _caption_ids(rng, vocab=vocab)
        inputs, labels = mlm_mask(ids, rng, 0.15, vocab, specials)
        assert inputs.dtype == np.int64 and labels.dtype == np.int64
        special = np.isin(ids, specials)
        sel = labels != IGNORE_INDEX
        assert not (sel & special).any(), "special tokens must never be selected"
        assert np.array_equal(inputs[~sel], ids[~sel]), "unselected tokens must be unchanged"
        assert np.array_equal(labels[sel], ids[sel]), "labels are the original ids"
        assert sel.any()
        assert not np.isin(inputs[sel & (inputs != MASK_ID)], specials).any()
        maskable += int((~special).sum())
        selected += int(sel.sum())
        masked += int((inputs[sel] == MASK_ID).sum())
        kept += int((inputs[sel] == ids[sel]).sum())
        randomised += int(((inputs[sel] != MASK_ID) & (inputs[sel] != ids[sel])).sum())
    assert 0.14 < selected / maskable < 0.17
    assert 0.77 < masked / selected < 0.83
    assert 0.08 < randomised / selected < 0.12
    assert 0.08 < kept / selected < 0.12


def test_mlm_mask_edge_cases():
    rng = np.random.default_rng(1)
    ids = np.array([SOS_ID, 17, EOS_ID, PAD_ID, PAD_ID])
    for _ in range(20):  # a single maskable token is always selected, even at a tiny probability
        _, labels = mlm_mask(ids, rng, 0.01, 100, (0, 1, 2, 3, 4))
        assert labels.tolist() == [-100, 17, -100, -100, -100]
    only_special = np.array([SOS_ID, EOS_ID, PAD_ID])
    inputs, labels = mlm_mask(only_special, rng, 0.5, 100, (0, 1, 2, 3, 4))
    assert inputs.tolist() == only_special.tolist() and (labels == IGNORE_INDEX).all()
    # random replacements never produce special ids, even with a vocabulary of 6
    for _ in range(200):
        inputs, labels = mlm_mask(np.array([2, 5, 5, 5, 5, 5, 5, 3]), rng, 0.9, 6, (0, 1, 2, 3, 4))
        assert set(inputs[1:7].tolist()) <= {4, 5}
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_mask(ids, rng, 0.0, 100, (0, 1, 2, 3, 4))


def test_training_is_deterministic():
    """Same captions -> byte-identical tokenizer (ids feed the embedding table: runs must repeat)."""
    captions = [f"a {c} {s} in the {p}" for c in ("red", "green", "blue", "amber") for s in
                ("circle", "square", "triangle") for p in ("top left", "centre", "bottom right")] * 5
    a = train_tokenizer(captions, 128)
    b = train_tokenizer(list(reversed(captions)), 128)
    c = train_tokenizer(captions, 128)
    assert a.to_json() == c.to_json()
    assert a.encode_batch(["a red circle"], 8).tolist() == b.encode_batch(["a red circle"], 8).tolist()
