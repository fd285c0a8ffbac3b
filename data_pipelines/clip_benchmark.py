"""LAION CLIP_benchmark's WebDataset layout: the files it reads, and laying out our shards in it.

CLIP_benchmark (`clip_benchmark eval --dataset wds/NAME --dataset_root DIR`, its `build_wds_dataset`)
reads::

    DIR/classnames.txt                           one class name per line, line i = `.cls` i (blank too)
    DIR/zeroshot_classification_templates.txt    one prompt per line, `{c}` where the class name goes
    DIR/dataset_type.txt                         optional: classification (default), retrieval, multilabel
    DIR/test/nshards.txt                         the number of shards n of the split
    DIR/test/0.tar ... DIR/test/{n-1}.tar        samples with an image (.webp/.png/.jpg/.jpeg) and .cls

Our writers (`data synth`, the digits set) put `classnames.txt` and the templates file beside their
shards; `pretrain data clip-benchmark SRC OUT` links (or copies) existing shards into the split folder
after checking every sample has what CLIP_benchmark's reader needs, so nothing half-usable is written.
This module sits in `data_pipelines` (it imports nothing from `pretrain`); `pretrain.evaluation.layout`
reads the layout back for `pretrain eval`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
"""What CLIP_benchmark's wds reader decodes (`to_tuple(["webp", "png", "jpg", "jpeg"], "cls")`)."""

EVAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "an image of a {c}.",
    "a picture showing a {c}.",
    "a {c} in the image.",
)
"""The prompts our writers store, in CLIP_benchmark's `{c}` form: the same four as `pretrain eval`'s
built-in `TEMPLATES` (a test keeps them equal), so finding this file beside our shards changes no
`pretrain eval` number and CLIP_benchmark scores with the very prompts we do."""

logger = logging.getLogger("data_pipelines")
_WARNED: set[tuple[str, tuple[str, ...]]] = set()
"""(file, content) already warned about in this process: one warning per classnames file, not per call."""

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: key up to the first dot of the name


def write_templates(folder: str | os.PathLike,
                    templates: tuple[str, ...] | list[str] = EVAL_TEMPLATES) -> Path:
    """Write `folder/zeroshot_classification_templates.txt`, one `{c}` template per line (as CLIP_benchmark's
    exporter does); templates in `{}` form are converted. Returns the path."""
    lines = [t.replace("{}", "{c}") for t in templates]
    bad = [t for t in lines if "{c}" not in t or "\n" in t]
    if not lines or bad:
        raise ValueError(f"templates need one line each with a {{c}} placeholder; bad: {bad or 'none given'}")
    path = Path(folder) / TEMPLATES_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stripped_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Every line of a text file, stripped, blank ones included, split as CLIP_benchmark splits it
    (`str.splitlines`: a final newline ends the last line, it adds none); FileNotFoundError / ValueError
    naming the file when it is missing or holds nothing but blanks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} file not found")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    if not any(lines):
        raise ValueError(f"{p}: no {what} (the file is empty)")
    return lines


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Stripped lines of a classnames.txt-like file, positional as CLIP_benchmark reads it
    (`[line.strip() for line in text.splitlines()]`): line i is entry i, a blank line included, since the
    `.cls` labels index the lines (dropping one shifted every later label onto the next line's name). A
    blank entry is kept and warned about, naming the file and line: its zero-shot prompts name nothing.
    A ValueError naming the file when there is no non-blank line."""
    lines = _stripped_lines(path, what)
    blank = [n for n, line in enumerate(lines, 1) if not line]
    key = (str(path), tuple(lines))
    if blank and key not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(key)
        more = f" and {len(blank) - 10} more" if len(blank) > 10 else ""
        logger.warning("%s: blank line %s%s: kept as %s entry %s (0-based), as CLIP_benchmark keeps it, so "
                       "later lines keep their index; zero-shot prompts for it name nothing", path,
                       ", ".join(map(str, blank[:10])), more, what, ", ".join(str(n - 1) for n in blank[:10]))
    return lines


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names of a classnames.txt: line i is class i (`read_lines`)."""
    return read_lines(path, "class names")


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a file, one per line, in our `{}` form: CLIP_benchmark's `{c}` lines are
    converted, `{}` lines kept, blank lines skipped (a template indexes nothing). A ValueError names the
    file and line when it is empty, a line has no placeholder, or a line would not format (a stray
    brace)."""
    out = []
    for n, line in enumerate(_stripped_lines(path, "zero-shot templates"), 1):
        if not line:
            continue
        t = line.replace("{c}", "{}")
        if "{}" not in t:
            raise ValueError(f"{path}: line {n} has no {{c}} placeholder for the class name: {line!r}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: line {n} is not a valid template ({e}): {line!r}") from None
        out.append(t)
    return out


def check_shard(path: Path, classes: int) -> int:
    """Number of samples in the local tar `path`, after checking each has an image CLIP_benchmark decodes
    and an integer `.cls` in [0, classes); a ValueError naming the shard, the key and the problem."""
    samples: dict[str, set[str]] = {}
    labels: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                m = _KEY.match(member.name)
                if not member.isfile() or not m:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                samples.setdefault(key, set()).add(ext)
                if ext == "cls":
                    labels[key] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar shard ({e})") from None
    if not samples:
        raise ValueError(f"{path}: holds no samples")
    if not labels:
        raise ValueError(f"{path}: no sample has a .cls label; CLIP_benchmark's zero-shot classification "
                         "needs one per sample")
    for key, exts in samples.items():
        if not exts & set(IMAGE_EXTENSIONS):
            raise ValueError(f"{path}: sample {key!r} has no image CLIP_benchmark reads "
                             f"({'/'.join(IMAGE_EXTENSIONS)}); it has {sorted(exts)}")
        if key not in labels:
            raise ValueError(f"{path}: sample {key!r} has no .cls label")
        try:
            label = int(labels[key].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: sample {key!r} has a .cls that is not an integer: "
                             f"{labels[key][:20]!r}") from None
        if not 0 <= label < classes:
            raise ValueError(f"{path}: sample {key!r} has .cls {label}, outside the {classes} class names")
    return len(samples)


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy
    except OSError:
        shutil.copyfile(src, dst)


def layout_for_clip_benchmark(shards: list[str], out: str | os.PathLike, classnames: list[str],
                              templates: tuple[str, ...] | list[str] = EVAL_TEMPLATES, split: str = "test"
                              ) -> dict[str, Any]:
    """Lay out local tar `shards` as CLIP_benchmark dataset `out` (see the module docstring): every shard
    is checked first, then `out` is built in a staging folder beside it and renamed into place, so a bad
    input leaves no `out` behind. `out` must not exist yet (or be an empty folder)."""
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: already exists; choose a new output folder")
    if not shards:
        raise ValueError("no shards to lay out")
    if not classnames:
        raise ValueError("no class names given")
    paths = []
    for url in shards:
        p = Path(url)
        if "://" in url or url.startswith("pipe:") or not p.is_file():
            raise ValueError(f"{url}: not a local tar file (a CLIP_benchmark layout is made of local shards)")
        paths.append(p)
    counts = [check_shard(p, len(classnames)) for p in paths]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (staging / split).mkdir()
        for i, p in enumerate(paths):
            _place(p, staging / split / f"{i}.tar")
        (staging / split / NSHARDS_FILE).write_text(f"{len(paths)}\n")
        (staging / CLASSNAMES_FILE).write_text("\n".join(classnames) + "\n", encoding="utf-8")
        write_templates(staging, templates)
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(dest), "split": split, "shards": len(paths), "samples": sum(counts),
            "classes": len(classnames), "urls": str(dest / split / f"{{0..{len(paths) - 1}}}.tar")}
