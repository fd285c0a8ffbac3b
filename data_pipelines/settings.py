"""The data section of the run configuration (`data.*`, owned here, composed into `pretrain.config`) and
the few numbers from other sections the training stream needs (`StreamSpec`), so this package never
imports `pretrain`."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_SAMPLE_BYTES = 64 << 20
"""64 MiB: see `DataConfig.max_sample_bytes`; also the default of the importers and `data inspect`."""


@dataclass
class DataConfig:
    train: str = ""
    """Training shards: brace-expandable URLs (`dir/shard-{000000..000031}.tar`), local paths,
    `pipe:CMD` or http(s). `pipe:` runs the user's own shell command, like webdataset does."""
    val: str = ""
    """Held-out shards, same syntax as `data.train`: validation during training (`eval.every`)."""
    workers: int = 2
    """DataLoader worker processes per rank; shards are split across ranks x workers (and within
    shards when there are fewer shards than that)."""
    shuffle_buffer: int = 500
    """Samples each worker holds for shuffling: every open shard is read in blocks of
    shuffle_buffer / interleave samples, each block permuted by a seed of (seed, epoch, shard, block),
    which keeps resume exact (<= 1 per block: shard order)."""
    shard_shuffle: bool = True
    """Shuffle the shard order each epoch (seeded by `train.seed` and the epoch)."""
    interleave: int = 4
    """Shards each worker reads at once, taking every next sample from one of them at random (seeded)."""
    sampling: str = "epoch"
    """`epoch`: every sample exactly once per epoch across all ranks and workers, with exact (also
    elastic) resume; `resampled`: shards drawn with replacement, weighted by `data.train_weights`."""
    train_weights: list[float] = field(default_factory=list)
    """Relative weight of each `::`-separated source of `data.train` (resampled sampling only); empty:
    every shard equally likely."""
    max_image_pixels: int = 89478485
    """Images with more pixels are skipped from their header (decompression bombs); 0: no limit."""
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
    """A sample whose tar members add up to more bytes is skipped as `too_large` (local, `pipe:` and
    http(s) shards alike: oversized members are skipped over in small blocks, never held); 0: no limit.
    The default, 64 MiB, is far above any real image (a JPEG at the `data.max_image_pixels` limit is
    ~20-40 MB), yet bounds what one shard can make a worker hold (at most `data.shuffle_buffer` such
    samples)."""
    max_bad_fraction: float = 0.5
    """Abort with an error when more than this fraction of the samples read (or of the shards opened)
    was unusable; 1 disables the check."""
    bad_check_after: int = 1000
    """Samples to read before `data.max_bad_fraction` is enforced (the first few are too noisy)."""
    log_keys: bool = False
    """Audit: append `epoch key step` of every consumed sample to RUN_DIR/keys/rank{R}.txt (data-parallel
    rank), kept consistent across resumes."""
    tokenizer: str = ""
    """Path of a tokenizer.json; `clip`: OpenAI CLIP's byte-level BPE (49,408 tokens + an MLM mask row,
    read from the installed open_clip_torch, the tokenizer of OpenAI/LAION checkpoints); empty trains a BPE
    tokenizer on `data.train` captions at start-up. Stored in the run directory either way."""
    vocab_size: int = 1024
    """Vocabulary size when a tokenizer is trained at start-up."""
    tokenizer_samples: int = 20000
    """How many captions to read from `data.train` when training the tokenizer."""
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    """Random-resized-crop area range (fraction of the source image)."""
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel normalisation mean (CLIP's)."""
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel normalisation std (CLIP's)."""


@dataclass(frozen=True)
class StreamSpec:
    """What the training stream needs beyond `data.*`: made by `pretrain.config.stream_spec(cfg)`."""

    seed: int = 0
    """`train.seed`: shard order, shuffling, crops, MLM masks and MAE patch noise derive from it."""
    micro_batch: int = 32
    """`train.micro_batch`: samples per batch."""
    image_size: int = 224
    """`model.image_size`: square crop size in pixels."""
    patch_size: int = 16
    """`model.vision.patch_size`: one MAE noise value per patch."""
    context_length: int = 77
    """`model.text.context_length`: token ids per caption."""
    mlm_prob: float = 0.15
    """`objectives.mlm.mask_prob`: fraction of caption tokens masked for MLM."""
    caption_negatives: bool = False
    """`objectives.itm.caption_negatives` with the match loss on: a sample without `neg.txt` is counted as
    `missing_negative` (it still trains, with a batch negative in its place)."""
    negatives_per_step: int = 1
    """`objectives.itm.caption_negatives_per_step`: `neg.txt` lines per sample per step."""
    skew_phrase: str = ""
    """`objectives.itm.skew_phrase` while the match loss skews toward it: each batch then carries `itm_skew`
    [B] (True where the caption contains it). "": no such key."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
