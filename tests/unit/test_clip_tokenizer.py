"""`data.tokenizer=clip`: OpenAI CLIP's BPE gives exactly open_clip's ids, is stored and restored through the
checkpoint JSON, keeps the MLM mask and padding away from real tokens, and the text tower pools at argmax."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.clip_tokenizer import (
    CLIP_MASK_ID,
    CLIP_VOCAB_SIZE,
    EOT_ID,
    SOT_ID,
    ClipTokenizer,
    clip_tokenizer_json,
    clip_vocab,
)
from data_pipelines.collate import TrainExample, collate_train
from data_pipelines.synth import make_sample
from data_pipelines.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_json
from pretrain.models.text import TextTower

open_clip = pytest.importorskip("open_clip")

ODD = ["A photo of a CAT.", "Hello, World!!  It's   12:30 o'clock", "naïve café, déjà vu",
       "&amp; &lt;b&gt; bold", "emoji 😀 test", "<start_of_text> inside", "don't WON'T I'm we'll", "x" * 300,
       "", "   ", "数字 中文 日本語", "tab\tand\nnewline", "Ã©tÃ© mojibake", "!!! ??? ...", "a!b!c",
       "1234567890", "ﬁne ligature", "\u00a0nbsp"]


def _captions(n: int = 600) -> list[str]:
    """Synthetic captions, the README's words shuffled into sentences (case, punctuation, digits, code) and
    odd cases (HTML entities, mojibake, emoji, CJK, special tokens, over-long)."""
    rng = random.Random(0)
    words = Path(__file__).resolve().parents[2].joinpath("README.md").read_text(encoding="utf-8").split()
    synth = [make_sample(i, 16, seed=0)["txt"].decode("utf-8") for i in range(100)]
    mixed = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(n - len(synth) - len(ODD))]
    return synth + mixed + ODD


@pytest.fixture(scope="module")
def clip() -> ClipTokenizer:
    return ClipTokenizer()


def test_vocabulary_and_merges_are_open_clips(clip: ClipTokenizer):
    simple = open_clip.tokenizer.SimpleTokenizer()
    vocab, merges, _ = clip_vocab()
    assert vocab == simple.encoder and len(vocab) == CLIP_VOCAB_SIZE
    assert {m: i for i, m in enumerate(merges)} == simple.bpe_ranks
    assert (clip.sos_id, clip.eos_id, clip.mask_id, clip.pad_id) == (SOT_ID, EOT_ID, CLIP_MASK_ID, 0)
    assert clip.vocab_size == CLIP_VOCAB_SIZE + 1 and clip.pool_type == "argmax"


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip_tokenize(clip: ClipTokenizer, context_length: int):
    texts = _captions()
    ours = clip.encode_batch(texts, context_length)
    theirs = open_clip.tokenize(texts, context_length=context_length)
    bad = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(texts)} captions differ, e.g. {bad[:3]}"
    assert ours.dtype == torch.int64 and (ours.argmax(dim=-1) == (ours == EOT_ID).int().argmax(dim=-1)).all()


def test_json_record_round_trips_and_pins_the_merges(clip: ClipTokenizer, tmp_path: Path):
    text = clip.to_json()
    assert json.loads(text)["vocab_size"] == CLIP_VOCAB_SIZE + 1 and len(text) < 1000
    assert isinstance(tokenizer_from_json(text), ClipTokenizer)
    clip.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert torch.equal(again.encode_batch(ODD, 20), clip.encode_batch(ODD, 20))
    assert isinstance(load_tokenizer("clip"), ClipTokenizer)
    restored = pickle.loads(pickle.dumps(clip))  # DataLoader workers
    assert torch.equal(restored.encode_batch(ODD, 20), clip.encode_batch(ODD, 20))
    other = json.loads(text)
    other["merges_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="ids would differ"):
        tokenizer_from_json(json.dumps(other))
    assert isinstance(tokenizer_from_json(TextTokenizer.to_json(_bpe())), TextTokenizer)


def _bpe() -> TextTokenizer:
    from data_pipelines.tokenizer import train_tokenizer

    return train_tokenizer(_captions(200), 200)


def test_mlm_never_masks_padding_or_specials_and_mask_row_is_new(clip: ClipTokenizer):
    texts = ["wow!~ a red circle!;", "a blue square !% at the top left", "!~"]  # '!~' -> ids 0, 349
    examples = [TrainExample(key=str(i), image=np.zeros((8, 8, 3), np.uint8), caption=t, cls=0,
                             mlm_rng=np.random.default_rng(i), noise_rng=np.random.default_rng(i))
                for i, t in enumerate(texts * 20)]
    batch = collate_train(examples, clip, 16, 0.5, 4, (0.5,) * 3, (0.5,) * 3)
    ids, labels, inputs = batch["text"], batch["mlm_labels"], batch["mlm_input"]
    eos = (ids == EOT_ID).int().argmax(dim=-1, keepdim=True)
    after = torch.arange(16)[None] >= eos
    assert (labels[after] == -100).all(), "padding (id 0, also '!') or <end_of_text> selected"
    assert (labels[:, 0] == -100).all()
    assert (labels[ids == 0] != -100).any(), "a real '!' (id 0) before <end_of_text> must stay maskable"
    assert (inputs == CLIP_MASK_ID).any() and CLIP_MASK_ID == CLIP_VOCAB_SIZE
    assert (inputs[after] == ids[after]).all()


def test_text_tower_pools_at_argmax_and_masks_by_position(clip: ClipTokenizer):
    torch.manual_seed(0)
    tower = TextTower(clip.vocab_size + 63, 16, width=32, layers=2, heads=4, embed_dim=8, eos_id=EOT_ID,
                      pad_id=0, pool_type="argmax").eval()
    ids = clip.encode_batch(["wow!~ a red circle!;", "hi"], 16)
    assert (ids[0, :6] == 0).any()  # a real token with the padding id
    assert torch.equal(tower.pool_positions(ids), ids.argmax(dim=-1))
    n = int((ids[0] == EOT_ID).nonzero()[0]) + 1
    with torch.no_grad():
        full = tower.forward_tokens(ids[:1])[:, :n]
        cut = tower.forward_tokens(ids[:1, :n], pad_id=-1)  # nothing masked: the '!' tokens are attended
        torch.testing.assert_close(full, cut)
        pooled = tower(ids)
        by_hand = tower(ids, return_tokens=True)[torch.arange(2), ids.argmax(-1)] @ tower.text_projection
        torch.testing.assert_close(pooled, by_hand)
    with pytest.raises(ValueError, match="pool_type"):
        TextTower(64, 16, width=32, layers=1, heads=4, embed_dim=8, pool_type="first")


def test_model_from_config_follows_the_tokenizer():
    from pretrain.config import load_config
    from pretrain.models import PretrainModel

    cfg = load_config(None, ["data.tokenizer=clip", "model.text.width=32", "model.text.layers=1",
                             "model.vision.layers=1", "model.decoder.layers=1"])
    with torch.device("meta"):
        model = PretrainModel.from_config(cfg)
    assert model.vocab_size == 49472 and model.text.pool_type == "argmax" and model.text.eos_id == EOT_ID
    assert json.loads(clip_tokenizer_json())["mask_id"] == 49408 < model.vocab_size
