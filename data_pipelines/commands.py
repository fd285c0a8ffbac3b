"""CLI subcommands owned by data_pipelines, registered through `pretrain.cli.REGISTRARS`:

    pretrain data import --from folder|csv|parquet|wds SRC OUT   shards + sizes.json + stats.json
    pretrain data inspect URLS [--json] [--labels]              counts, keys/extensions, bad by reason
    pretrain data clip-benchmark URLS OUT                        LAION CLIP_benchmark's wds dataset layout
"""

from __future__ import annotations

import argparse
import json
import re


def parse_size(text: str) -> int:
    """`1000`, `512MB`, `1.5GiB`, `2G` -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 500MB, 1GiB)")
    number, unit = float(match.group(1)), match.group(2)
    power = " kmgt".index(unit[0]) if unit and unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit else 1000
    return int(number * base**power)


def cmd_import(args: argparse.Namespace) -> int:
    from .importers import ImportOptions, run_import

    opts = ImportOptions(samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes,
                         workers=args.workers, prefix=args.prefix, check=args.check,
                         max_image_pixels=args.max_image_pixels, max_sample_bytes=args.max_sample_bytes,
                         image_col=args.image_col, caption_col=args.caption_col, key_col=args.key_col,
                         delimiter=args.delimiter,
                         opener=args.opener, progress=not args.no_progress, overwrite=args.overwrite,
                         labels=args.labels)
    stats = run_import(args.source_kind, args.src, args.out, opts)
    short = {k: stats[k] for k in ("out", "samples", "bytes", "skipped", "urls", "wall_s") if k in stats}
    short["shards"] = len(stats["shards"])
    print(json.dumps(short), flush=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_report, inspect_shards

    report = inspect_shards(args.urls, decode=not args.no_decode, max_image_pixels=args.max_image_pixels,
                            workers=args.workers, max_sample_bytes=args.max_sample_bytes, labels=args.labels)
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0


def cmd_clip_benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .clip_benchmark import (
        CLASSNAMES_FILE,
        EVAL_TEMPLATES,
        TEMPLATES_FILE,
        layout_for_clip_benchmark,
        read_lines,
        read_templates,
    )
    from .urls import expand_urls

    shards = expand_urls(args.urls)
    beside = Path(shards[0]).parent
    names = Path(args.classnames) if args.classnames else beside / CLASSNAMES_FILE
    if not names.is_file():
        raise FileNotFoundError(f"{names}: no class names; pass --classnames FILE (one name per line, "
                                "line i = .cls i)")
    templates_file = Path(args.templates) if args.templates else beside / TEMPLATES_FILE
    if args.templates or templates_file.is_file():
        templates = read_templates(templates_file)
    else:
        templates = list(EVAL_TEMPLATES)
    summary = layout_for_clip_benchmark(shards, args.out, read_lines(names, "class names"), templates,
                                        split=args.split)
    print(json.dumps(summary), flush=True)
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `data import` and `data inspect` (see the module docstring)."""
    from .importers import SOURCE_KINDS
    from .settings import DEFAULT_MAX_SAMPLE_BYTES

    p = data.add_parser("import", help="convert a folder, CSV/TSV, Parquet or WebDataset shards to shards")
    p.add_argument("--from", dest="source_kind", required=True, choices=SOURCE_KINDS,
                   help="folder: images + NAME.txt captions; csv: image path/URL + caption columns; "
                        "parquet: image bytes/paths + caption; wds: re-shard existing shards")
    p.add_argument("src", help="folder, .csv/.tsv file, .parquet file or folder, or shard URLs")
    p.add_argument("out", help="output folder for shards, sizes.json and stats.json: new or empty unless "
                               "--overwrite")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--shard-bytes", type=parse_size, default=0, help="also cap shard size, e.g. 1GB")
    p.add_argument("--workers", type=int, default=4, help="loader processes (0: in-process)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--check", choices=("header", "decode"), default="header",
                   help="header: format, size and pixel limit; decode: also decode every image")
    p.add_argument("--max-image-pixels", type=int, default=89478485, help="skip larger images (0: no limit)")
    p.add_argument("--max-sample-bytes", type=parse_size, default=DEFAULT_MAX_SAMPLE_BYTES,
                   help="skip images (and samples) over this many bytes, e.g. 64MiB (0: no limit)")
    p.add_argument("--image-col", default="", help="CSV/Parquet column with the image (guessed if omitted)")
    p.add_argument("--caption-col", default="", help="CSV/Parquet column with the caption")
    p.add_argument("--key-col", default="", help="column with sample keys (default: row number)")
    p.add_argument("--delimiter", default="", help="CSV separator (default: tab for .tsv, else comma)")
    p.add_argument("--opener", default="", help="module:function mapping an image URL/path to bytes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty OUT: replace the earlier import with the same --prefix there "
                        "(only once this one succeeded; other files stay). OUT holding SRC is always refused")
    p.add_argument("--labels", action="store_true",
                   help="classifier data (folder, wds): keep image + .cls samples without a caption; a "
                        "sample with neither a caption nor a .cls class index is skipped as missing_label")
    p.set_defaults(func=cmd_import)

    p = data.add_parser("inspect", help="count samples, keys, extensions and bad samples by reason")
    p.add_argument("urls", help="shard URLs (brace-expandable, '::'-joined, pipe:, http)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-decode", action="store_true", help="check members and captions only")
    p.add_argument("--labels", action="store_true",
                   help="check as a classifier (train.task=classify) reads: image + .cls class index, no "
                        "caption needed (missing_label / bad_label instead of missing_caption)")
    p.add_argument("--workers", type=int, default=0, help="inspect shards in parallel processes")
    p.add_argument("--max-image-pixels", type=int, default=89478485)
    p.add_argument("--max-sample-bytes", type=parse_size, default=DEFAULT_MAX_SAMPLE_BYTES,
                   help="skip samples whose tar members add up to more bytes, as data.max_sample_bytes "
                        "does (0: no limit)")
    p.set_defaults(func=cmd_inspect)

    p = data.add_parser("clip-benchmark", help="lay out labelled shards as a CLIP_benchmark wds dataset")
    p.add_argument("urls", help="local shard URLs (brace-expandable); every sample needs an image and .cls")
    p.add_argument("out", help="new folder: OUT/SPLIT/0.tar.. + nshards.txt, classnames.txt, "
                   "zeroshot_classification_templates.txt (shards are hard-linked when possible)")
    p.add_argument("--classnames", help="class names file (default: classnames.txt beside the shards)")
    p.add_argument("--templates", help="prompt templates, one per line with {c} or {} (default: the file "
                   "beside the shards, else pretrain eval's built-in prompts)")
    p.add_argument("--split", default="test", help="split folder name CLIP_benchmark reads (--split)")
    p.set_defaults(func=cmd_clip_benchmark)
