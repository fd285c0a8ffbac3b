"""Small file helpers shared by the data room (it imports nothing from the other rooms)."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename, so a crash mid-write never
    leaves a half-written file under the final name (tokenizer.json, sizes.json, stats.json, audits)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
