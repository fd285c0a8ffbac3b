"""What `pretrain eval --data` points at: shard URLs, or a dataset folder in LAION CLIP_benchmark's layout.

    pretrain eval --checkpoint RUN --data DIR                       # CLIP_benchmark folder or our shards
    pretrain eval --checkpoint RUN --data 'val/shard-{000000..000001}.tar' [--classnames F] [--templates F]

A folder is read the way CLIP_benchmark reads it (`data_pipelines.clip_benchmark`): `DIR/<split>/` with
`nshards.txt` and `0.tar ..`, `classnames.txt` and `zeroshot_classification_templates.txt` in `DIR`; a
folder of plain `*.tar` shards (what `pretrain data synth` writes) works too; without `nshards.txt` the
`*.tar` files are read in numeric name order (2.tar before 10.tar, as `{0..N-1}.tar`). For shard URLs the
two text files are looked for beside the shards, then one folder up (CLIP_benchmark keeps them above the
split folder). Explicit `--classnames` / `--templates` win; without any templates file the built-in prompts of
`pretrain.evaluation.evaluate.TEMPLATES` are used, so old command lines give the numbers they gave.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.clip_benchmark import (
    CLASSNAMES_FILE,
    DATASET_TYPE_FILE,
    NSHARDS_FILE,
    TEMPLATES_FILE,
)
from data_pipelines.clip_benchmark import read_templates as _read_templates
from data_pipelines.urls import expand_urls, is_local, local_path, split_sources


@dataclass
class EvalData:
    """A resolved evaluation set: shard URLs, the class names file, and the prompts (None: built-in)."""

    urls: str
    classnames: Path | None  # None only when asked for without (`resolve_eval_data(need_classnames=False)`)
    templates: list[str] | None
    templates_file: Path | None
    layout: str  # "clip_benchmark", "folder" or "urls"


def read_templates(path: str | Path) -> list[str]:
    """Templates from `path`, one per line, as `str.format` patterns with `{}` (CLIP_benchmark's `{c}` is
    converted, so its files and ours both work). A ValueError names the file and line when it is empty, a
    line lacks a placeholder, or a line does not format."""
    return _read_templates(path)


def _dataset_type(folder: Path) -> str:
    f = folder / DATASET_TYPE_FILE
    return f.read_text().strip().lower() if f.is_file() else "classification"


def _numeric_order(path: Path) -> tuple[list[str | int], str]:
    """Sort key reading digit runs as numbers: 0.tar, 1.tar, 2.tar, .., 10.tar, the order CLIP_benchmark's
    `{0..N-1}.tar` gives (a plain sort puts 10.tar after 1.tar, so `--max-samples` would take other
    samples); zero-padded names (`shard-000010.tar`) keep their order."""
    parts: list[str | int] = [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", path.name))]
    return parts, path.name


def _shards_of(folder: Path, split: str) -> tuple[str, str] | None:
    """(brace URL spec, layout) of a folder's shards, or None when it holds none."""
    split_dir = folder / split
    nshards = split_dir / NSHARDS_FILE
    if nshards.is_file():
        try:
            n = int(nshards.read_text().strip())
        except ValueError:
            raise ValueError(f"{nshards}: not a shard count: {nshards.read_text()[:40]!r}") from None
        if n < 1:
            raise ValueError(f"{nshards}: says {n} shards")
        missing = [str(split_dir / f"{i}.tar") for i in range(n) if not (split_dir / f"{i}.tar").is_file()]
        if missing:
            raise FileNotFoundError(f"{nshards} says {n} shards, but {missing[0]} is missing "
                                    f"({len(missing)} missing)")
        return str(split_dir / f"{{0..{n - 1}}}.tar") if n > 1 else str(split_dir / "0.tar"), "clip_benchmark"
    for where, layout in ((split_dir, "clip_benchmark"), (folder, "folder")):
        tars = sorted(where.glob("*.tar"), key=_numeric_order) if where.is_dir() else []
        if tars:
            return "::".join(str(t) for t in tars), layout
    return None


def shard_file(url: str) -> Path | None:
    """The file a local shard URL names (a plain path, `file://PATH` or `file:PATH`, converted by
    `data_pipelines.urls.local_path` as start-up and validation convert it), None for pipe:/remote URLs."""
    return Path(local_path(url)) if is_local(url) else None


def look_beside(first_shard: str, name: str) -> Path | None:
    """`name` in the first shard's folder or its parent (CLIP_benchmark's place), for local shards (plain
    paths and file: URLs, so `pretrain eval` finds what validation finds on the same `data.val`)."""
    path = shard_file(first_shard)
    if path is None:
        return None
    here = path.parent
    for folder in (here, here.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def find_templates(first_shard: str,
                   templates: str | Path | None = None) -> tuple[Path | None, list[str] | None]:
    """(file, prompts) of the zero-shot templates for shards starting with `first_shard`: `templates` when
    given, else `TEMPLATES_FILE` beside the shard or one folder up; (None, None): the built-in prompts.
    `pretrain eval` and in-training validation both call this, so their zero-shot numbers agree."""
    tfile = Path(templates) if templates else look_beside(first_shard, TEMPLATES_FILE)
    return tfile, (read_templates(tfile) if tfile is not None else None)


def check_captions(first_shard: str) -> None:
    """Refuse, by name, a local shard whose first sample has no `.txt` caption (CLIP_benchmark's own
    exporter writes classification sets as image + `.cls` only): `pretrain eval` reads image-caption pairs
    (retrieval) and would otherwise skip every sample as `missing_caption` and report nothing readable.
    An unreadable shard (empty, corrupt) is left to the eval loader, which skips it and counts it as
    `bad_shard` (named in a warning; with no other readable shard the error names it) like any other.
    A fine-tuned classifier reads such sets (image + `.cls`): `resolve_eval_data(captions=False)` skips
    this check."""
    path = shard_file(first_shard)
    if path is None or not path.is_file():
        return
    key, exts = None, set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = Path(member.name).name
                if not member.isfile() or "." not in name:
                    continue
                k, ext = str(Path(member.name).parent / name.split(".", 1)[0]), name.split(".", 1)[1].lower()
                if key is not None and k != key:
                    break
                key = k
                exts.add(ext)
    except (tarfile.TarError, OSError):
        return
    if key is not None and "txt" not in exts:
        raise ValueError(f"{first_shard}: sample {key!r} has no .txt caption ({', '.join(sorted(exts))}); "
                         "pretrain eval of a CLIP model needs image-caption pairs (sets from "
                         "clip_benchmark_export_wds, image + .cls only, are read for fine-tuned classifiers "
                         "only)")


def resolve_eval_data(data: str, classnames: str | Path | None = None, templates: str | Path | None = None,
                      split: str = "test", need_classnames: bool = True, captions: bool = True) -> EvalData:
    """Shards, class names and prompts for `data` (a dataset folder or shard URLs; see the module
    docstring). Raises FileNotFoundError/ValueError naming what is missing, before any model is loaded.
    `need_classnames=False` (a fine-tuned classifier, whose checkpoint records its classes): no class-names
    file found is `classnames=None`, not an error. `captions=False` (the same reader): shards without `.txt`
    captions are not refused (`check_captions`)."""
    folder = Path(data)
    if "::" not in data and "{" not in data and folder.is_dir():
        found = _shards_of(folder, split)
        if found is None:
            raise FileNotFoundError(f"{folder}: no shards: expected {folder}/{split}/{NSHARDS_FILE} with "
                                    f"0.tar.. (CLIP_benchmark's layout) or *.tar files in the folder")
        urls, layout = found
        kind = _dataset_type(folder)
        if kind != "classification":
            raise ValueError(f"{folder}: {DATASET_TYPE_FILE} says {kind!r}; pretrain eval reads "
                             "classification sets (a .cls label per sample)")
        first = expand_urls(split_sources(urls)[0])[0]
    else:
        urls, layout = data, "urls"
        first = expand_urls(split_sources(data)[0])[0]
    if captions:
        check_captions(first)
    names = Path(classnames) if classnames else look_beside(first, CLASSNAMES_FILE)
    if names is None and not need_classnames:
        return EvalData(urls=urls, classnames=None, templates=None, templates_file=None, layout=layout)
    if names is None:
        raise FileNotFoundError(f"no class names for {data}: pass --classnames FILE or put {CLASSNAMES_FILE} "
                                f"beside the shards (looked in {Path(local_path(first)).parent} and its "
                                "parent)")
    if not names.is_file():
        raise FileNotFoundError(f"{names}: class names file not found")
    tfile, prompts = find_templates(first, templates)
    return EvalData(urls=urls, classnames=names, templates=prompts, templates_file=tfile, layout=layout)
