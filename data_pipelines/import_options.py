"""Options of `pretrain data import` (`ImportOptions`), in a module of their own so the sources
(`import_sources`, `import_csv`) and the driver (`importers`) can all read them without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass

from .settings import DEFAULT_MAX_SAMPLE_BYTES


@dataclass
class ImportOptions:
    """How an import writes and checks; the defaults suit web-scale data."""

    samples_per_shard: int = 10000
    shard_bytes: int = 0
    """Start a new shard before one would exceed this many bytes (0: by samples only)."""
    workers: int = 4
    """Loader processes (0: load in the main process)."""
    prefix: str = "shard"
    check: str = "header"
    """`header`: open each image (format, size, pixel limit); `decode`: also decode it fully (catches
    truncated files, ~10x slower)."""
    max_image_pixels: int = 89478485
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
    """Skip (as `too_large`) images and samples over this many bytes, as training's data.max_sample_bytes
    would; local files and http(s) bodies over it are never read whole (0: no limit)."""
    image_col: str = ""
    caption_col: str = ""
    key_col: str = ""
    delimiter: str = ""
    """CSV field separator; empty: tab for .tsv files, else comma."""
    opener: str = ""
    """`module:function` that maps an image URL or path to bytes (e.g. an S3 client); empty: local files
    and http(s) via urllib."""
    progress: bool = True
    overwrite: bool = False
    """Allow a non-empty OUT: replace the import with the same `prefix` there once this one succeeded
    (`import_output`). OUT holding the import's own source is refused regardless."""
    labels: bool = False
    """Classifier data (`--labels`): keep samples with a `.cls` class index and no caption (image + `.cls`,
    what fine-tuning with train.task=classify and its eval read); a sample needs a caption or a usable
    label, and one with neither is skipped as `missing_label` (`bad_label`: the `.cls` it relies on is
    not a non-negative integer). Folder and WebDataset sources only: tables have no `.cls` member."""
