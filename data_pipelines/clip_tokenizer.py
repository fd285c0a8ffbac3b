"""OpenAI CLIP's byte-level BPE (`data.tokenizer=clip`), read from the merges file open_clip_torch ships.

The vocabulary is the one every OpenAI/LAION CLIP checkpoint was trained with: 256 byte symbols, the same
256 with `</w>`, 48,894 merges, `<start_of_text>` = 49406 and `<end_of_text>` = 49407 (49,408 tokens).
Nothing is downloaded: the merges file `open_clip/bpe_simple_vocab_16e6.txt.gz` is found through the
installed package without importing it (open_clip pulls in torchvision), and the vocabulary is rebuilt
exactly as `open_clip.tokenizer.SimpleTokenizer` builds it.

Text clean-up is CLIP's (`ftfy.fix_text`, HTML unescaped twice, whitespace collapsed, lower-cased) in
Python; the BPE itself runs batched in the Rust `tokenizers` library with CLIP's pre-tokenizer regex, so a
batch of captions costs one Rust call plus one clean-up per caption.

The ids equal `open_clip.tokenize`'s with one exception: open_clip splits words with the Python `regex`
module, we with the Oniguruma inside `tokenizers`, and where the two know different Unicode versions a
character assigned only in the newer one is a letter or digit to one and an unassigned symbol to the other,
so a caption holding it may split differently around it (with regex 2026.12 and tokenizers 0.23: the
characters added in Unicode 17.0, which only regex knows). A test sweeps every assigned code point of
Python's Unicode version; no other character differs.

Rows our model needs beyond CLIP's 49,408: the MLM `[MASK]` token gets id 49408, a row appended after the
pretrained table, so importing a CLIP checkpoint leaves every pretrained embedding row as it was (the new
row, like the vocabulary padding, starts at the model's fresh initialisation). The text never produces
it: `<mask>` in a caption is ordinary text. Exports write CLIP's 49,408 rows, so stock tokenizers load them.

Padding is 0 as in `open_clip.tokenize`. Id 0 is also the real token "!", so padding is told apart by
position (after the first `<end_of_text>`), never by id: the text tower pools at argmax(ids) (= the first
`<end_of_text>`, the highest id a caption holds), as OpenAI CLIP does, and the MLM pass masks keys after it.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .files import write_text_atomic

CLIP_SPEC = "clip"
"""The `data.tokenizer` / `--tokenizer` value that selects this tokenizer."""
FORMAT = "mmpt-clip-bpe"
"""`type` of the small JSON that stands for this tokenizer in checkpoints, run dirs and weight exports."""
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
"""Tokens of OpenAI CLIP's vocabulary: the embedding rows of every OpenAI/LAION text tower."""
SOT, EOT, MASK = "<start_of_text>", "<end_of_text>", "<mask>"
SOT_ID, EOT_ID, CLIP_MASK_ID = 49406, 49407, 49408
CLIP_PAD_ID = 0
_N_MERGES = 49152 - 256 - 2  # open_clip/OpenAI read merges[1 : 49152 - 256 - 2 + 1]
_WORD_PATTERN = r"""<[sſ]tart_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"""
"""CLIP's pre-tokenizer regex as open_clip's Python `regex` applies it with IGNORECASE to lower-cased text:
the exact special tokens are the added tokens below; caselessly `s` also matches U+017F ſ (so `'ſ` is a
contraction and `<ſtart_of_text>` one word, BPE'd as text), and U+0345 (combining ypogegrammeni, which
folds to ι) matches no class at all there, so it is dropped like whitespace. Other case folds reach no
alternative of lower-cased text (a test sweeps every code point)."""


def merges_path() -> Path:
    """The merges file inside the installed open_clip_torch; a clear error when it is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("data.tokenizer=clip reads OpenAI CLIP's BPE merges from the open_clip_torch "
                         "package, which is not installed (pip install open_clip_torch ftfy)")
    path = Path(next(iter(spec.submodule_search_locations))) / MERGES_FILE
    if not path.is_file():
        raise ValueError(f"open_clip_torch is installed but has no {MERGES_FILE} at {path}")
    return path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """(token -> id, merges in rank order, sha256 of the merges file), exactly as SimpleTokenizer builds
    them: bytes, bytes + `</w>`, one token per merge, then the two special tokens."""
    raw = merges_path().read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1:_N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or vocab[EOT] != EOT_ID:
        raise ValueError(f"{merges_path()}: gives {len(vocab)} tokens, not OpenAI CLIP's {CLIP_VOCAB_SIZE}")
    return vocab, merges, hashlib.sha256(raw).hexdigest()


def clean_caption(text: str) -> str:
    """CLIP's clean-up (open_clip's `clean="lower"`): ftfy, HTML unescaped twice, whitespace collapsed,
    lower-cased."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _build_rust_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges, _ = clip_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # the special tokens written in a caption map to their ids, as SimpleTokenizer's regex does
    tok.add_special_tokens([AddedToken(SOT, normalized=False), AddedToken(EOT, normalized=False)])
    return tok


class ClipTokenizer:
    """OpenAI CLIP's tokenizer with `TextTokenizer`'s interface: <start_of_text> tokens <end_of_text>, 0...

    `vocab_size` is 49,409: CLIP's 49,408 plus the MLM mask row (module docstring)."""

    pool_type = "argmax"
    """How the text tower finds the pooled position: argmax over the ids, as OpenAI CLIP."""

    def __init__(self) -> None:
        self._tok = _build_rust_tokenizer()
        self._tok.no_truncation()
        self._tok.no_padding()

    # ---------------------------------------------------------------------------------- persistence
    def to_json(self) -> str:
        """The small JSON that stands for this tokenizer (`clip_tokenizer_json`)."""
        return clip_tokenizer_json()

    def runtime_json(self) -> str:
        """The `tokenizers` library's JSON of the Rust tokenizer this class encodes with (CLIP's vocabulary,
        merges, pre-tokenizer regex and special tokens): what a runtime without open_clip loads, e.g. the
        ONNX export's tokenizer.json. `to_json` is only the small record naming the merges file."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically, like `TextTokenizer.save`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer.json") -> ClipTokenizer:
        """From `to_json` text; refuses a different merges file than the installed one (other ids)."""
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        if not is_clip_json(meta):
            raise ValueError(f"{source} is not a CLIP tokenizer record ({FORMAT})")
        installed = clip_vocab()[2]
        if meta.get("merges_sha256") != installed:
            raise ValueError(f"{source}: CLIP tokenizer built from merges with sha256 "
                             f"{meta.get('merges_sha256')}, but the installed open_clip ships {installed}: "
                             f"the ids would differ")
        return cls()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return CLIP_VOCAB_SIZE + 1

    @property
    def pad_id(self) -> int:
        return CLIP_PAD_ID

    @property
    def unk_id(self) -> int:
        return EOT_ID  # byte-level: nothing is unknown; HF's CLIPTokenizer names <|endoftext|>

    @property
    def sos_id(self) -> int:
        return SOT_ID

    @property
    def eos_id(self) -> int:
        return EOT_ID

    @property
    def mask_id(self) -> int:
        return CLIP_MASK_ID

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids MLM never selects or draws (padding is excluded by position: 0 is also "!")."""
        return (SOT_ID, EOT_ID, CLIP_MASK_ID)

    # -------------------------------------------------------------------------------------- encoding
    def encode_batch(self, texts: list[str], context_length: int) -> torch.Tensor:
        """Token ids [B, context_length], identical to `open_clip.tokenize(texts, context_length)`:
        <start_of_text> tokens <end_of_text> then 0; long captions are cut so they still end with
        <end_of_text>; for the one exception (characters of a newer Unicode version) see the module
        docstring."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold <start_of_text> and <end_of_text>, "
                             f"got {context_length}")
        encodings = self._tok.encode_batch([clean_caption(t) for t in texts], add_special_tokens=False)
        out = np.full((len(encodings), context_length), CLIP_PAD_ID, dtype=np.int64)
        out[:, 0] = SOT_ID
        keep = context_length - 2
        for row, enc in zip(out, encodings):  # one slice assignment per caption, not per token
            ids = enc.ids[:keep]
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = EOT_ID
        return torch.from_numpy(out)

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of one text, without special tokens (for inspection)."""
        return self._tok.encode(clean_caption(text), add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int]) -> str:
        """Text for a row of ids; special tokens and padding after <end_of_text> dropped."""
        inverse = {i: t for t, i in clip_vocab()[0].items()}
        pieces = []
        for i in (int(i) for i in ids):
            if i == EOT_ID:
                break
            if i not in (SOT_ID, CLIP_MASK_ID) and i in inverse:
                pieces.append(inverse[i])
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        raw = bytearray(byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

def clip_tokenizer_json() -> str:
    """The JSON record of OpenAI CLIP's tokenizer, stored where our BPE's tokenizer.json would be
    (checkpoints, run dirs, weight exports); the merges file's sha256 pins the vocabulary."""
    return json.dumps({"type": FORMAT, "version": 1, "merges_file": f"open_clip/{MERGES_FILE}",
                       "merges_sha256": clip_vocab()[2], "vocab_size": CLIP_VOCAB_SIZE + 1,
                       "mask_token": MASK, "mask_id": CLIP_MASK_ID, "pad_id": CLIP_PAD_ID,
                       "pool": ClipTokenizer.pool_type}, indent=2) + "\n"


def is_clip_json(obj: object) -> bool:
    """True for the JSON record (text or parsed) `ClipTokenizer.to_json` writes."""
    if isinstance(obj, str):
        if FORMAT not in obj[:200]:
            return False
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError:
            return False
    return isinstance(obj, dict) and obj.get("type") == FORMAT
