"""Caption tokenizer: a byte-pair-encoding model trained with HF `tokenizers`, with fixed special ids.

The special tokens sit at fixed ids 0-4 so the model code (padding mask, [EOS] pooling, MLM) can rely on
them without carrying the tokenizer around. Only `encode_batch` places them: the same strings written in a
caption ("[EOS]", "[MASK]") are encoded as ordinary text. Encoding runs in the Rust tokenizer on whole
batches; Python only places each caption's ids into a pre-padded array (no per-token work, no stateful
padding settings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from .clip_tokenizer import CLIP_SPEC, ClipTokenizer, is_clip_json
from .files import write_text_atomic
from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .shardstream import shard_samples
from .stats import BAD_TEXT, EMPTY_CAPTION, MISSING_CAPTION, TOO_LARGE, TOO_LARGE_KEY, SkipCounter
from .urls import expand_urls

logger = logging.getLogger("data_pipelines")

PAD, UNK, SOS, EOS, MASK = "[PAD]", "[UNK]", "[SOS]", "[EOS]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, SOS, EOS, MASK)
PAD_ID, UNK_ID, SOS_ID, EOS_ID, MASK_ID = range(len(SPECIAL_TOKENS))


def _check_specials(tok: Tokenizer, source: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != expected:
            raise ValueError(f"tokenizer {source}: special token {token} has id {got}, expected {expected} "
                             f"(ids {', '.join(f'{t}={i}' for i, t in enumerate(SPECIAL_TOKENS))} are fixed)")


class TextTokenizer:
    """A trained BPE tokenizer with the fixed special ids, encoding captions to [SOS] ... [EOS] [PAD]..."""

    pool_type = "eos"
    """How the text tower finds the pooled position: the first [EOS] (`ClipTokenizer` pools at argmax)."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>") -> None:
        _check_specials(tokenizer, source)
        self._tok = tokenizer
        # captions are text: a literal "[EOS]" or "[PAD]" in one must not become the id the model pools at
        # or masks out. Not stored in tokenizer.json, so set on every construction (load, unpickle too).
        self._tok.encode_special_tokens = True
        self._tok.post_processor = processors.TemplateProcessing(
            single=f"{SOS} $A {EOS}", special_tokens=[(SOS, SOS_ID), (EOS, EOS_ID)])
        self._tok.no_truncation()
        self._tok.no_padding()

    # ---------------------------------------------------------------------------------- persistence
    def to_json(self) -> str:
        """The tokenizer.json text (HF format; its post-processor adds [SOS]/[EOS] for other users)."""
        return self._tok.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a crash mid-write must not leave a corrupt file in a run dir)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Read a tokenizer.json written by `save` (or any HF tokenizer with the same special ids)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a generic Exception with a serde message
            raise ValueError(f"tokenizer file {path} is not a valid tokenizer.json: {exc}") from None
        return cls(tok, source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer.json") -> TextTokenizer:
        """From tokenizer.json text (as checkpoints and exports carry it); a clear error if it is not one."""
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a generic Exception with a serde message
            raise ValueError(f"{source} is not a valid tokenizer.json: {exc}") from None
        return cls(tok, source=source)

    def __getstate__(self) -> dict:
        return {"json": self.to_json()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]))

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def sos_id(self) -> int:
        return SOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def mask_id(self) -> int:
        return MASK_ID

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(range(len(SPECIAL_TOKENS)))

    # -------------------------------------------------------------------------------------- encoding
    def encode_batch(self, texts: list[str], context_length: int) -> torch.Tensor:
        """Token ids [B, context_length]: [SOS] tokens [EOS] then [PAD]; long captions are cut so that they
        still start with [SOS] and end with [EOS] (the text tower pools at [EOS])."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold [SOS] and [EOS], got {context_length}")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = np.full((len(encodings), context_length), PAD_ID, dtype=np.int64)
        out[:, 0] = SOS_ID
        keep = context_length - 2
        for row, enc in zip(out, encodings):  # one slice assignment per caption, not per token
            ids = enc.ids[:keep]
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = EOS_ID
        return torch.from_numpy(out)

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of one text, without special tokens (for inspection)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int]) -> str:
        """Text for a row of ids, special tokens dropped (for logging predictions)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_from_json(text: str, source: str = "tokenizer.json") -> TextTokenizer | ClipTokenizer:
    """The tokenizer a checkpoint, run directory or export stores: OpenAI CLIP's (`ClipTokenizer`'s small
    JSON record) or our trained BPE (an HF tokenizer.json with our fixed special ids)."""
    if is_clip_json(text):
        return ClipTokenizer.from_json(text, source=source)
    return TextTokenizer.from_json(text, source=source)


def load_tokenizer(spec: str | os.PathLike) -> TextTokenizer | ClipTokenizer:
    """`data.tokenizer`'s value: `clip` (OpenAI CLIP's BPE from the installed open_clip) or the path of a
    tokenizer.json (ours, or a file `ClipTokenizer.save` wrote)."""
    if str(spec) == CLIP_SPEC:
        return ClipTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (or give `{CLIP_SPEC}` for OpenAI CLIP's)")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), source=str(path))


def _new_bpe() -> Tokenizer:
    # No end-of-word suffix: HF's trainer adds suffixed symbols in hash-map order, which made two trainings
    # on the same captions assign different ids (and so different runs). Without it training is
    # deterministic; words never merge across whitespace anyway (the pre-tokenizer splits there).
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # splits on whitespace and on each punctuation
    return tok


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small (must exceed the {len(SPECIAL_TOKENS)} "
                         f"special tokens)")


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a lowercase BPE tokenizer on `captions` (an iterable, consumed once).

    The vocabulary may come out smaller than `vocab_size` when the corpus has fewer distinct merges; use
    `TextTokenizer.vocab_size` for the embedding table.
    """
    _check_vocab_size(vocab_size)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in captions:
            if not isinstance(text, str):
                raise TypeError(f"captions must be strings, got {type(text).__name__}")
            seen += 1
            yield text

    tok = _new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("cannot train a tokenizer on zero captions")
    return TextTokenizer(tok)


def train_tokenizer_from_shards(urls: str, vocab_size: int, max_samples: int,
                                max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> TextTokenizer:
    """Train on the `.txt` captions of the first `max_samples` good samples of `urls`, in shard order.

    Only caption members are read from the tars (images are skipped without decoding), and unreadable
    captions or shards, and samples over `max_sample_bytes`, are skipped and counted like in training.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    _check_vocab_size(vocab_size)
    shards = expand_urls(urls)
    skips = SkipCounter(where="tokenizer")

    def captions() -> Iterator[str]:
        taken = 0
        for sample in shard_samples(shards, skips, select_files=lambda name: name.lower().endswith(".txt"),
                                    max_bytes=max_sample_bytes):
            if TOO_LARGE_KEY in sample:
                skips.skip(TOO_LARGE, f"{sample.get('__key__', '?')}: {sample[TOO_LARGE_KEY]}")
                continue
            raw = sample.get("txt")
            if raw is None:
                skips.skip(MISSING_CAPTION, sample.get("__key__", "?"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.skip(BAD_TEXT, sample.get("__key__", "?"))
                continue
            if not text.strip():
                skips.skip(EMPTY_CAPTION, sample.get("__key__", "?"))
                continue
            yield text
            taken += 1
            if taken >= max_samples:
                return

    try:
        tok = train_tokenizer(captions(), vocab_size)
    except ValueError as exc:
        # a labelled image set (image + .cls, what a classifier fine-tunes on) has no captions to learn from;
        # its samples hold no member `select_files` keeps, so they are not even counted as missing_caption
        hint = ("; these shards hold no .txt captions (image + .cls only?): give a tokenizer with "
                "data.tokenizer (a tokenizer.json, or `clip`), or start from a checkpoint (--init-from), "
                "whose tokenizer is used"
                if skips[MISSING_CAPTION] or not skips.total else "")
        raise ValueError(f"no usable captions in {urls!r} to train a tokenizer (skips: {skips.as_dict()}): "
                         f"{exc}{hint}") from None
    if skips.total:
        logger.warning("tokenizer training skipped: %s", skips.as_dict())
    return tok
