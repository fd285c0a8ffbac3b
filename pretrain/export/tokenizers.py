"""Which tokenizer an export carries and an import gets, and whether it fits the embedding table.

Two tokenizers exist (data_pipelines): our trained BPE ([EOS] = 3, the text tower pools at the first
[EOS]) and OpenAI CLIP's (`data.tokenizer=clip`, 49,408 tokens, pooling at argmax over the ids). An
export writes the files each library's stock tokenizer reads: for CLIP's that is HF `CLIPTokenizer`'s
vocab.json + merges.txt (the hub's openai/clip-vit-* files, rebuilt from open_clip's merges) and
open_clip's own `SimpleTokenizer`, and CLIP's 49,408 embedding rows (our MLM mask row and the padding
rows stay behind, like the MLM head). An import reads those back, or takes `--tokenizer`, and refuses a
tokenizer whose size or pooling token does not fit the checkpoint, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipelines.clip_tokenizer import (
    CLIP_SPEC,
    CLIP_VOCAB_SIZE,
    EOT,
    EOT_ID,
    SOT,
    clip_tokenizer_json,
    clip_vocab,
    is_clip_json,
)
from data_pipelines.tokenizer import tokenizer_from_json

HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
"""transformers' names of CLIP's two special tokens (open_clip's: <start_of_text>, <end_of_text>)."""
CLIP_POOL_IDS = (2, EOT_ID)
"""HF `text_config.eos_token_id` values that mean OpenAI CLIP's pooling: 2 (legacy: argmax over the ids)
and 49407 (first <|endoftext|>, the same position for every CLIP-tokenized row)."""


def is_clip(tokenizer_json: str) -> bool:
    return is_clip_json(tokenizer_json)


def hf_clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary under transformers' special-token names (vocab.json of the hub's CLIP folders)."""
    names = {SOT: HF_SOT, EOT: HF_EOT}
    return {names.get(t, t): i for t, i in clip_vocab()[0].items()}


def write_clip_tokenizer_files(out: Path, context_length: int) -> None:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json: what
    `transformers.CLIPTokenizer.from_pretrained(out)` / `CLIPProcessor` read, plus our tokenizer record
    (mmpt_tokenizer.json) so a re-import knows the run's tokenizer without comparing vocabularies."""
    (out / "vocab.json").write_text(json.dumps(hf_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(m) for m in clip_vocab()[1]]
    (out / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": False, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (out / "mmpt_tokenizer.json").write_text(clip_tokenizer_json(), encoding="utf-8")


def export_rows(state: dict[str, torch.Tensor], tokenizer_json: str) -> dict[str, torch.Tensor]:
    """`state` with the token embedding cut to CLIP's 49,408 rows when the tokenizer is CLIP's (the MLM
    mask row and the padding are ours alone); unchanged for our BPE."""
    if not is_clip(tokenizer_json):
        return state
    key = "text.token_embedding.weight"
    return {**state, key: state[key][:CLIP_VOCAB_SIZE]}


# ---------------------------------------------------------------------------------------------- import
def tokenizer_in_folder(src: Path) -> str | None:
    """The tokenizer record of an import folder: ours (mmpt_tokenizer.json, or a tokenizer.json with our
    special ids), CLIP's (vocab.json/merges.txt or an HF tokenizer.json holding exactly CLIP's vocabulary),
    or None. A CLIP-style vocabulary that is not OpenAI CLIP's is refused (its ids would differ)."""
    if (src / "mmpt_tokenizer.json").is_file():
        return (src / "mmpt_tokenizer.json").read_text(encoding="utf-8")
    vocab: dict[str, int] | None = None
    if (src / "vocab.json").is_file():
        vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    elif (src / "tokenizer.json").is_file():
        text = (src / "tokenizer.json").read_text(encoding="utf-8")
        model = json.loads(text).get("model") or {}
        if HF_EOT not in (model.get("vocab") or {}):
            return text  # ours (checked against our special ids when it is loaded)
        vocab = model["vocab"]
    if vocab is None:
        return None
    if vocab != hf_clip_vocab():
        raise ValueError(f"{src}: its tokenizer vocabulary ({len(vocab)} tokens) is not OpenAI CLIP's "
                         f"({CLIP_VOCAB_SIZE}); pass --tokenizer FILE with the tokenizer it was trained with")
    merges = src / "merges.txt"
    if merges.is_file():
        lines = [ln for ln in merges.read_text(encoding="utf-8").splitlines() if ln]
        lines = lines[1:] if lines and lines[0].startswith("#version") else lines
        if [tuple(ln.split()) for ln in lines] != clip_vocab()[1]:
            raise ValueError(f"{src}/merges.txt is not OpenAI CLIP's merges; pass --tokenizer FILE")
    return clip_tokenizer_json()


def tokenizer_json_for(spec: str) -> str:
    """`--tokenizer` of `pretrain convert --from`: `clip` or a tokenizer file's text."""
    if spec == CLIP_SPEC:
        return clip_tokenizer_json()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {spec}: no such file (or give `{CLIP_SPEC}`)")
    return path.read_text(encoding="utf-8")


def check_tokenizer(rows: int, tokenizer_json: str | None, clip_pooling: bool, source: str
                    ) -> tuple[str | None, dict[str, Any]]:
    """(tokenizer record, config overrides) for a checkpoint with `rows` token-embedding rows.

    `clip_pooling`: the checkpoint's text tower pools as OpenAI CLIP does (argmax / <end_of_text>); then
    the tokenizer defaults to CLIP's and must be it, with exactly 49,408 rows (the mask row is appended
    fresh, `pretrain convert`). Otherwise it must be our BPE (pooling at [EOS] = 3) with at most `rows`
    tokens; our model pads to `rows` with `model.vocab_pad_multiple = rows`."""
    if tokenizer_json is None:
        if not clip_pooling:
            return None, {"model.vocab_pad_multiple": rows}
        tokenizer_json = clip_tokenizer_json()
    tok = tokenizer_from_json(tokenizer_json, source=f"{source}'s tokenizer")
    n = tok.vocab_size
    if clip_pooling and not is_clip(tokenizer_json):
        raise ValueError(f"{source} pools its text as OpenAI CLIP (at <end_of_text>, the highest of its "
                         f"{rows} ids) but the tokenizer has {n} tokens with its end token at id "
                         f"{tok.eos_id}: use --tokenizer {CLIP_SPEC}")
    if not clip_pooling and is_clip(tokenizer_json):
        raise ValueError(f"{source} pools its text at our [EOS] id (a {rows}-row table) but the tokenizer is "
                         f"OpenAI CLIP's ({CLIP_VOCAB_SIZE} tokens, end token {EOT_ID})")
    if is_clip(tokenizer_json):
        if rows != CLIP_VOCAB_SIZE:
            raise ValueError(f"{source}: the tokenizer (OpenAI CLIP's) has {CLIP_VOCAB_SIZE} tokens but the "
                             f"checkpoint's token embedding has {rows} rows")
        return tokenizer_json, {"data.tokenizer": CLIP_SPEC}
    if n > rows:
        raise ValueError(f"{source}: its tokenizer has {n} tokens but the embedding table only {rows} rows")
    return tokenizer_json, {"model.vocab_pad_multiple": rows}
