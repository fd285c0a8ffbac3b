"""The usage example in `pretrain.export.hf`'s docstring runs, as written, with the installed transformers
on a real export (transformers 5 made `get_text_features` return an output object, review round 4,
finding 4), and its embeddings are the model's own."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_weights

from data_pipelines.tokenizer import TextTokenizer
from pretrain.checkpoint.convert import convert
from pretrain.export import hf

pytest.importorskip("transformers")


def _example() -> str:
    doc = hf.__doc__ or ""
    block = doc.split("Loading an export (no network needed)::\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def test_docstring_example_runs(tmp_path: Path, tiny_tok: TextTokenizer):
    from PIL import Image

    export = tmp_path / "export"
    convert(write_tiny_weights(tmp_path / "weights", tiny_tok), export, "hf")
    scope = {"texts": ["a photo of a cat", "two dogs"],
             "images": [Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (32, 32), (0, 90, 200))]}
    with torch.no_grad():
        exec(_example().replace("EXPORT_DIR", str(export)), scope)  # noqa: S102 - our own docstring
    txt = scope["txt"]
    assert isinstance(txt, torch.Tensor), f"the example's text features are a {type(txt).__name__}"
    out = scope["out"]
    torch.testing.assert_close(txt, out.text_embeds)
