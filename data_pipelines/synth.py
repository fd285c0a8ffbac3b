"""Synthetic image-caption shards: coloured shapes with descriptive captions, for smoke tests and demos.

The data are designed so a tiny CLIP learns them in a few hundred steps (large shapes, well separated
colours, captions that name colour and shape), which makes "did training work" checkable by zero-shot
accuracy on the 32 colour x shape classes. Every sample is generated from its own (seed, index) RNG and the
tar headers carry fixed metadata, so the same arguments give byte-identical shards on any machine with the
same Pillow/libjpeg.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from .clip_benchmark import TEMPLATES_FILE, write_templates
from .import_output import refuse_non_empty

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 35),
    "purple": (140, 55, 185),
    "orange": (250, 135, 25),
    "cyan": (35, 200, 215),
    "pink": (250, 125, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (238, 238, 238),
    "black": (22, 22, 22),
}
CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
"""Class names in `.cls` order: index = colour_index * len(SHAPES) + shape_index."""

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
_TEMPLATES = (
    "{a} {size} {colour} {shape} in the {position} of the image on a {background} background",
    "a photo of {a} {colour} {shape}",
    "{a} {colour} {shape} on a {background} background",
    "there is {a} {size} {colour} {shape} near the {position}",
    "{colour} {shape}, {size}, {position}",
    "a simple drawing of {a} {colour} {shape} in the {position}",
)
_SUPERSAMPLE = 2
_TAR_MTIME = 946684800  # 2000-01-01: fixed so tar bytes do not depend on when they were written


def _position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return f"middle {_COLS[col]}"
    if col == 1:
        return _ROWS[row]
    return f"{_ROWS[row]} {_COLS[col]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        bar = side / 3
        draw.rectangle((x0 + bar, y0, x1 - bar, y1), fill=fill)
        draw.rectangle((x0, y0 + bar, x1, y1 - bar), fill=fill)
    else:  # pragma: no cover - SHAPES is fixed above
        raise ValueError(f"unknown shape {shape}")


def make_sample(index: int, image_size: int, seed: int) -> dict[str, Any]:
    """One synthetic sample (`__key__`, jpg, txt, json, cls as bytes), a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    frac = float(rng.uniform(0.35, 0.70))
    size_word = "small" if frac < 0.47 else "medium" if frac < 0.58 else "large"
    row, col = int(rng.integers(3)), int(rng.integers(3))
    # the shape's top-left corner, as a fraction of the free space, within the chosen third
    fx = (col + float(rng.uniform(0.1, 0.9))) / 3
    fy = (row + float(rng.uniform(0.1, 0.9))) / 3
    canvas = image_size * _SUPERSAMPLE
    side = frac * canvas
    x0, y0 = fx * (canvas - side), fy * (canvas - side)
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[background])
    _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    jpg = io.BytesIO()
    img.save(jpg, format="JPEG", quality=90)
    position = _position_name(row, col)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    words = {"size": size_word, "colour": colour, "shape": shape, "position": position,
             "background": background}
    after = template.split("{a} ", 1)[1] if "{a} " in template else ""
    following = words[after[1:after.index("}")]] if after.startswith("{") else ""
    caption = template.format(a=_article(following or "x"), **words)
    cls = CLASSNAMES.index(f"{colour} {shape}")
    attrs = {
        "class": cls, "classname": CLASSNAMES[cls], "colour": colour, "shape": shape, "size": size_word,
        "size_fraction": round(frac, 4), "position": position, "background": background,
        "bbox": [round(v / _SUPERSAMPLE, 2) for v in (x0, y0, x0 + side, y0 + side)],
    }
    return {
        "__key__": f"s{seed}_{index:09d}",
        "jpg": jpg.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(attrs, sort_keys=True).encode("utf-8"),
        "cls": str(cls).encode("ascii"),
    }


# ------------------------------------------------------------------------ compositional (two objects)
# Two objects side by side, captions whose word ORDER binds the attributes ("red circle left of blue
# square"), for the fusion encoder's attribute-binding probe. A bag of words cannot tell such a caption
# from its swaps: "blue circle left of red square" (colours swapped between the shapes) and "blue square
# left of red circle" (objects swapped) use the same words. Each sample's `.json` carries both swaps
# (`swapped_colours`, `swapped_objects`) for the probe (`pretrain/evaluation/binding.py`). The two objects
# always differ in colour AND shape, so every swap describes another image. `.cls` is the left object's
# colour x shape class (the single-object set's 32 class names), so zero-shot still runs on these shards.
# `.neg.txt` holds the same two swaps as training negatives (`objectives.itm.caption_negatives`); the probe
# scores held-out shards, so what it measures is whether binding learned on training images carries over.

RELATIONS = ("left of", "right of")
_PAIR_TEMPLATES = (
    "{c1} {s1} {rel} {c2} {s2}",
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a picture of a {c1} {s1} {rel} a {c2} {s2}",
)


def pair_caption(template: int, first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """Caption naming `first` (colour, shape) in `relation` to `second`."""
    c1, s1 = first
    c2, s2 = second
    return _PAIR_TEMPLATES[template].format(c1=c1, s1=s1, rel=relation, c2=c2, s2=s2)


def make_pair_sample(index: int, image_size: int, seed: int) -> dict[str, Any]:
    """One two-object sample (`__key__`, jpg, txt, json, cls as bytes), a pure function of its arguments."""
    rng = np.random.default_rng([seed, index, 2])  # 2: another stream than the single-object samples
    c_left, c_right = (list(COLOURS)[int(i)] for i in rng.choice(len(COLOURS), 2, replace=False))
    s_left, s_right = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), 2, replace=False))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    canvas = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    boxes = []
    for half, (colour, shape) in enumerate(((c_left, s_left), (c_right, s_right))):
        side = float(rng.uniform(0.30, 0.42)) * canvas
        x0 = half * canvas / 2 + float(rng.uniform(0.02, 0.98)) * (canvas / 2 - side)
        y0 = float(rng.uniform(0.05, 0.95)) * (canvas - side)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        boxes.append([round(v / _SUPERSAMPLE, 2) for v in (x0, y0, x0 + side, y0 + side)])
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    jpg = io.BytesIO()
    img.save(jpg, format="JPEG", quality=90)
    template = int(rng.integers(len(_PAIR_TEMPLATES)))
    left, right = (c_left, s_left), (c_right, s_right)
    # say it from either side: "A left of B" or "B right of A"
    first, relation, second = (left, "left of", right) if rng.integers(2) == 0 else (right, "right of", left)
    caption = pair_caption(template, first, relation, second)
    swapped_colours = pair_caption(template, (second[0], first[1]), relation, (first[0], second[1]))
    swapped_objects = pair_caption(template, second, relation, first)
    cls = CLASSNAMES.index(f"{c_left} {s_left}")
    attrs = {
        "class": cls, "classname": CLASSNAMES[cls], "background": background, "bboxes": boxes,
        "objects": [{"colour": c, "shape": s} for c, s in (left, right)],
        "swapped_colours": swapped_colours, "swapped_objects": swapped_objects,
    }
    return {
        "__key__": f"p{seed}_{index:09d}",
        "jpg": jpg.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(attrs, sort_keys=True).encode("utf-8"),
        "cls": str(cls).encode("ascii"),
        "neg.txt": f"{swapped_colours}\n{swapped_objects}".encode(),  # objectives.itm.caption_negatives
    }


def check_synth_out(out: Path, overwrite: bool) -> dict[str, Any]:
    """Refuse an OUT that is a file, or a non-empty folder unless `overwrite`; return its sizes.json
    entries (kept for other prefixes) when overwriting."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    refuse_non_empty(out, entries, overwrite, "its shards with this prefix, sizes.json, classnames.txt and "
                     "zeroshot_classification_templates.txt (other files stay)")
    try:
        old = json.loads((out / "sizes.json").read_text(encoding="utf-8")) if entries else {}
    except (OSError, ValueError):
        old = {}  # missing or unreadable: rewritten below
    return old if isinstance(old, dict) else {}


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    samples: int,
    samples_per_shard: int,
    image_size: int,
    seed: int,
    prefix: str = "shard",
    compositional: bool = False,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Write `OUT/{prefix}-000000.tar ...` plus classnames.txt, zeroshot_classification_templates.txt
    (CLIP_benchmark's names) and sizes.json; return a summary.

    Summary keys: out_dir, shards (count), samples, files (shard paths), urls (a brace spec for
    `data.train`), classnames (path), templates (path).

    `compositional=True` writes two-object samples whose captions bind attributes by word order
    (`make_pair_sample`), with the swapped captions of the attribute-binding probe.

    `overwrite=False` (what `pretrain data synth` passes unless --overwrite) refuses a non-empty OUT, as
    `data import` does: these writes replace shards, sizes.json and the user's classnames.txt/templates.
    Programs that write into folders of their own (the demo, the benches, tests) keep the default. With
    `overwrite`, the older `{prefix}-NNNNNN.tar` shards this run does not write are removed (sizes.json would
    not name them, yet `*.tar` layouts would read them) and other prefixes' sizes.json entries are kept.
    """
    if samples < 1 or samples_per_shard < 1:
        raise ValueError(f"samples ({samples}) and samples_per_shard ({samples_per_shard}) must be >= 1")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    old_sizes = check_synth_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (samples + samples_per_shard - 1) // samples_per_shard
    sizes: dict[str, int] = {}
    files: list[str] = []
    for shard in range(n_shards):
        name = f"{prefix}-{shard:06d}.tar"
        final, tmp = out / name, out / f".{name}.tmp"
        start, stop = shard * samples_per_shard, min(samples, (shard + 1) * samples_per_shard)
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME, user="",
                                                      group="", mode=0o644) as writer:
            for index in range(start, stop):
                writer.write((make_pair_sample if compositional else make_sample)(index, image_size, seed))
        os.replace(tmp, final)
        sizes[name] = stop - start
        files.append(str(final))
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n", encoding="utf-8")
    write_templates(out)  # CLIP_benchmark's zeroshot_classification_templates.txt, our eval prompts
    mine = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    for stale in sorted(p for p in out.iterdir() if mine.fullmatch(p.name) and p.name not in sizes):
        stale.unlink()  # only reachable with overwrite: a fresh OUT holds nothing but what this run wrote
    sizes = {**{k: v for k, v in old_sizes.items() if not mine.fullmatch(k)}, **sizes}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    last = n_shards - 1
    urls = str(out / f"{prefix}-{{000000..{last:06d}}}.tar") if n_shards > 1 else files[0]
    return {"out_dir": str(out), "shards": n_shards, "samples": samples, "files": files, "urls": urls,
            "classnames": str(out / "classnames.txt"), "templates": str(out / TEMPLATES_FILE)}
