"""Typed run configuration: one dataclass per concern, loaded from YAML with dotted overrides.

Every field carries a docstring (the string literal under it); `field_help()` reads them back with
`ast` so `pretrain config --show` and the README's reference come from one source. Unknown keys and
values of the wrong type raise `ConfigError` naming the key and what would have been valid, so a typo
in a 500-node job fails in a second rather than silently using a default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    train: str = ""
    """Training shards: brace-expandable URLs (`dir/shard-{000000..000031}.tar`), local paths,
    `pipe:CMD` or http(s). `pipe:` runs the user's own shell command, like webdataset does."""
    val: str = ""
    """Held-out shards for evaluation, same syntax as `data.train`."""
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
    max_bad_fraction: float = 0.5
    """Abort with an error when more than this fraction of the samples read (or of the shards opened)
    was unusable; 1 disables the check."""
    bad_check_after: int = 1000
    """Samples to read before `data.max_bad_fraction` is enforced (the first few are too noisy)."""
    log_keys: bool = False
    """Audit: append `epoch key step` of every consumed sample to RUN_DIR/keys/rank{R}.txt (data-parallel
    rank), kept consistent across resumes."""
    tokenizer: str = ""
    """Path of a tokenizer.json; empty trains a BPE tokenizer on `data.train` captions at start-up
    and stores it in the run directory."""
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


@dataclass
class VisionConfig:
    patch_size: int = 8
    """Patch side in pixels; `model.image_size` must be a multiple of it."""
    width: int = 128
    """Transformer width of the image tower."""
    layers: int = 4
    """Number of transformer blocks in the image tower."""
    heads: int = 4
    """Attention heads in the image tower; must divide `width`."""


@dataclass
class TextConfig:
    width: int = 128
    """Transformer width of the text tower."""
    layers: int = 4
    """Number of transformer blocks in the text tower."""
    heads: int = 4
    """Attention heads in the text tower; must divide `width`."""
    context_length: int = 32
    """Tokens per caption including start and end tokens (longer captions are truncated)."""


@dataclass
class DecoderConfig:
    width: int = 64
    """Width of the MAE pixel decoder."""
    layers: int = 2
    """Number of transformer blocks in the MAE decoder."""
    heads: int = 4
    """Attention heads in the MAE decoder; must divide `width`."""


@dataclass
class ModelConfig:
    image_size: int = 64
    """Side of the square training images in pixels."""
    embed_dim: int = 128
    """Dimension of the joint image-text embedding space."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    activation: str = "gelu"
    """MLP activation: gelu or quick_gelu (OpenAI CLIP's)."""
    dropout: float = 0.0
    """Dropout in attention output and MLP (0 for pretraining at scale)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities. The probabilities are per head, so under tensor parallelism
    each TP rank draws its heads' masks from its own random stream (megatron's RNG tracker); runs with
    different `parallel.tp` then draw different masks, so set 0 to compare layouts exactly."""
    vocab_pad_multiple: int = 64
    """The embedding table is padded to a multiple of this (tensor-parallel friendly)."""
    attention: str = "sdpa"
    """Attention kernel: `sdpa` (torch's scaled_dot_product_attention: flash / memory-efficient kernels on
    GPU) or `math` (explicit softmax(QK^T/sqrt(d))V, the reference). Same parameters and results."""
    fused_layernorm: bool = False
    """apex FusedLayerNorm instead of nn.LayerNorm (needs apex built with CUDA; a config error otherwise).
    Same parameter names and shapes, so checkpoints stay interchangeable."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image tower (ViT)."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower (causal transformer, CLIP-style)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """MAE decoder that reconstructs masked patches."""


@dataclass
class ContrastiveConfig:
    weight: float = 1.0
    """Weight of the CLIP InfoNCE loss in the total (0 disables it)."""
    init_temperature: float = 0.07
    """Initial softmax temperature (learned as a log logit scale)."""
    max_logit_scale: float = 100.0
    """Upper clamp of the learned logit scale (1 / temperature)."""
    loss: str = "infonce"
    """`infonce`: CLIP's softmax loss in both directions; `siglip`: SigLIP's pairwise sigmoid loss with a
    learned logit bias (initialised at -10; the parameter exists only with this choice)."""
    chunk: int = 0
    """0: plain loss holding the B_local x B_global logits; > 0: tiled loss over chunk x chunk blocks
    recomputed in backward, never holding the logits (same value and gradients, ~2x the logit FLOPs)."""


@dataclass
class MIMConfig:
    weight: float = 1.0
    """Weight of the MAE masked-image loss (0 disables the decoder)."""
    mask_ratio: float = 0.5
    """Fraction of patches hidden from the image encoder during training. The same visible-patch
    pass feeds the contrastive loss (FLIP), so this also speeds training up; 0 keeps all patches."""
    norm_pix_loss: bool = True
    """Reconstruct per-patch normalised pixels (MAE's better-representation setting)."""


@dataclass
class MLMConfig:
    weight: float = 1.0
    """Weight of the BERT-style masked-language loss (0 disables the bidirectional pass)."""
    mask_prob: float = 0.15
    """Fraction of caption tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""


@dataclass
class ObjectivesConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Contrastive image-text loss (CLIP)."""
    mim: MIMConfig = field(default_factory=MIMConfig)
    """Masked image modeling (MAE)."""
    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Masked language modeling (BERT)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `optim.lr` (cosine schedule)."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to `optim.lr`."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine or constant."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases, norms, embeddings, logit scale)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    impl: str = "auto"
    """AdamW implementation: `torch` (torch.optim.AdamW), `torch_fused` (torch.optim.AdamW(fused=True)),
    `deepspeed_fused` (DeepSpeed FusedAdam, CUDA only), `apex_fused` (apex FusedAdam, CUDA + apex),
    `cpu_adam` (DeepSpeedCPUAdam with the optimizer offloaded to CPU by ZeRO, stage >= 1; JIT-built) or
    `auto` (deepspeed_fused on CUDA, torch_fused on CPU, torch where fused is unsupported)."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to run."""
    micro_batch: int = 32
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch x grad_accum x dp."""
    precision: str = "bf16"
    """Numeric precision: bf16 (bf16 params, fp32 master weights), fp16 (dynamic loss scaling), fp32, or
    bf16_autocast (fp32 params and master weights, bf16 compute under torch.autocast; DeepSpeed's
    `torch_autocast`)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seed for initialisation, shuffling, augmentation and masking."""
    activation_checkpointing: bool = False
    """Recompute transformer blocks in backward instead of storing their activations."""
    global_batch: int = 0
    """Expected global batch (micro_batch x grad_accum x data-parallel ranks); 0 derives it. Set it in
    recipes so a launch with the wrong rank count fails before training instead of changing the math."""
    nonfinite_patience: int = 3
    """A micro-batch whose loss is NaN/inf is skipped and counted; this many in a row stop the run with
    the step and the objective that went non-finite."""
    compile: bool = False
    """torch.compile each transformer block (not the DeepSpeed engine); the first steps are slow while
    it compiles (inductor; on CPU it needs a C++ compiler)."""


@dataclass
class ParallelConfig:
    zero_stage: int = 3
    """DeepSpeed ZeRO stage 0-3 (3 partitions parameters, gradients and optimizer states)."""
    tp: int = 1
    """Tensor-parallel degree; data-parallel degree is world size / tp."""
    timeout_s: int = 600
    """Collective timeout in seconds; a dead or missing rank fails the job after this."""
    persistence_threshold: int = 10000
    """ZeRO-3 keeps parameters with fewer elements than this unpartitioned (saves collectives on
    biases and norms; 0 partitions everything)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end of training)."""
    dir: str = ""
    """Checkpoint directory (default: RUN_DIR/checkpoints)."""
    keep_last: int = 0
    """Keep only the newest N complete checkpoints (0 keeps all). Never deletes the one `latest` names."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of K, whatever `keep_last` says (0: none)."""
    max_failures: int = 3
    """A failed save (full or unwritable disk) is reported and training goes on from memory; this many
    failures in a row stop the run. The final save must succeed."""
    universal: bool = False
    """Also write each checkpoint in the layout-free universal format (`<dir>/universal/<tag>`: full fp32
    weights and Adam moments per parameter, with TP split metadata), which `--resume` loads under any
    other data-/tensor-parallel layout. Same as `pretrain convert SRC DST --to universal` afterwards."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Write metrics every N optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under RUN_DIR/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: metrics.jsonl, tensorboard/, tokenizer.json, config.yaml, checkpoints/."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Input shards, decoding and tokenization."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the towers and decoder."""
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    """Losses and their weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, precision."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """ZeRO and tensor parallelism."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When and where to save."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard, progress bar."""
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""


# ----------------------------------------------------------------------------------- choices
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.activation": ("gelu", "quick_gelu"),
    "model.attention": ("sdpa", "math"),
    "optim.schedule": ("cosine", "constant"),
    "optim.impl": ("auto", "torch", "torch_fused", "deepspeed_fused", "apex_fused", "cpu_adam"),
    "objectives.contrastive.loss": ("infonce", "siglip"),
    "train.precision": ("bf16", "fp16", "fp32", "bf16_autocast"),
    "parallel.zero_stage": (0, 1, 2, 3),
}


# ------------------------------------------------------------------------------------ loading
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key, tp, value = prefix + name, hints[name], data[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(_field_names(tp))}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], YAML-parsed value) so `x=3` is an int and `x=[1,2]` a list."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    if value is None:
        value = raw
    return key.split("."), value


def _set_nested(tree: dict[str, Any], path: list[str], value: Any, cls: type, full: str) -> None:
    """Insert `value` at `path`, validating each segment against the schema for a clear error."""
    node, scls = tree, cls
    for i, part in enumerate(path):
        names = _field_names(scls)
        if part not in names:
            where = ".".join(path[:i]) or "top level"
            raise ConfigError(f"unknown config key '{full}': '{part}' is not in {where}; "
                              f"valid keys: {', '.join(names)}")
        tp = typing.get_type_hints(scls)[part]
        if i == len(path) - 1:
            if _is_dataclass_type(tp):
                raise ConfigError(f"'{full}' is a section; set one of its keys: "
                                  f"{', '.join(_field_names(tp))}")
            node[part] = value
        else:
            if not _is_dataclass_type(tp):
                raise ConfigError(f"'{'.'.join(path[:i + 1])}' is not a section in '{full}'")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{'.'.join(path[:i + 1])}' must be a mapping")
            scls = tp


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Read YAML (safe_load: nothing in it runs), apply `dotted.key=value` overrides, validate (against
    `world_size` too when given, so every problem is listed in one error)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_nested(tree, keys, value, Config, ".".join(keys))
    cfg = _build(Config, tree, "")
    validate(cfg, world_size=world_size)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------- validation
def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check ranges, choices and divisibility; raise one ConfigError listing every problem."""
    problems: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        check(value in choices, f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    m = cfg.model
    check(m.image_size > 0 and m.vision.patch_size > 0 and m.image_size % m.vision.patch_size == 0,
          f"model.image_size ({m.image_size}) must be a positive multiple of "
          f"model.vision.patch_size ({m.vision.patch_size})")
    for name, tower in (("vision", m.vision), ("text", m.text), ("decoder", m.decoder)):
        check(tower.width > 0 and tower.heads > 0 and tower.width % tower.heads == 0,
              f"model.{name}.heads ({tower.heads}) must divide model.{name}.width ({tower.width})")
        check(tower.layers >= 1, f"model.{name}.layers must be >= 1")
    check(m.text.context_length >= 4, "model.text.context_length must be >= 4")
    check(m.embed_dim > 0, "model.embed_dim must be > 0")
    check(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    check(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout must be in [0, 1)")
    check(m.vocab_pad_multiple >= 1, "model.vocab_pad_multiple must be >= 1")
    o = cfg.objectives
    for name in ("contrastive", "mim", "mlm"):
        check(getattr(o, name).weight >= 0, f"objectives.{name}.weight must be >= 0")
    check(o.contrastive.weight + o.mim.weight + o.mlm.weight > 0,
          "at least one of objectives.{contrastive,mim,mlm}.weight must be > 0")
    check(0.0 <= o.mim.mask_ratio < 1.0, "objectives.mim.mask_ratio must be in [0, 1)")
    check(not (o.mim.weight > 0 and o.mim.mask_ratio == 0),
          "objectives.mim.mask_ratio must be > 0 when objectives.mim.weight > 0")
    check(0.0 < o.mlm.mask_prob < 1.0, "objectives.mlm.mask_prob must be in (0, 1)")
    check(o.contrastive.init_temperature > 0, "objectives.contrastive.init_temperature must be > 0")
    check(o.contrastive.chunk >= 0, "objectives.contrastive.chunk must be >= 0 (0: plain loss)")
    t = cfg.train
    check(t.steps >= 1, "train.steps must be >= 1")
    check(t.micro_batch >= 1, "train.micro_batch must be >= 1")
    check(t.grad_accum >= 1, "train.grad_accum must be >= 1")
    check(t.grad_clip >= 0, "train.grad_clip must be >= 0")
    check(t.global_batch >= 0, "train.global_batch must be >= 0")
    check(t.nonfinite_patience >= 1, "train.nonfinite_patience must be >= 1")
    if world_size is not None and t.global_batch and world_size % max(cfg.parallel.tp, 1) == 0:
        dp = world_size // max(cfg.parallel.tp, 1)
        check(t.global_batch == t.micro_batch * t.grad_accum * dp,
              f"train.global_batch ({t.global_batch}) != train.micro_batch ({t.micro_batch}) x "
              f"train.grad_accum ({t.grad_accum}) x data-parallel ranks ({dp} = world {world_size} / "
              f"tp {cfg.parallel.tp})")
    op = cfg.optim
    check(op.lr > 0, "optim.lr must be > 0")
    check(0 <= op.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    check(op.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    check(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas),
          "optim.betas must be two numbers in [0, 1)")
    check(op.impl != "cpu_adam" or cfg.parallel.zero_stage >= 1,
          f"optim.impl=cpu_adam offloads the optimizer through ZeRO: it needs parallel.zero_stage >= 1 "
          f"(got {cfg.parallel.zero_stage})")
    d = cfg.data
    check(d.workers >= 0, "data.workers must be >= 0")
    check(d.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
    check(d.interleave >= 1, "data.interleave must be >= 1")
    check(d.sampling in ("epoch", "resampled"),
          f"data.sampling: {d.sampling!r} is not one of epoch, resampled")
    check(all(w > 0 for w in d.train_weights), "data.train_weights must all be > 0")
    check(not d.train_weights or d.sampling == "resampled",
          "data.train_weights needs data.sampling=resampled (epoch sampling reads every sample once)")
    if d.train_weights and d.train:
        sources = len(d.train.split("::"))
        check(len(d.train_weights) == sources,
              f"data.train_weights has {len(d.train_weights)} entries but data.train has {sources} "
              f"'::'-separated source(s)")
    check(d.max_image_pixels >= 0, "data.max_image_pixels must be >= 0 (0: no limit)")
    check(0 < d.max_bad_fraction <= 1, "data.max_bad_fraction must be in (0, 1]")
    check(d.bad_check_after >= 0, "data.bad_check_after must be >= 0")
    check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
          "data.crop_scale must be [min, max] with 0 < min <= max <= 1")
    check(len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
          "data.mean and data.std must have 3 entries (std > 0)")
    check(d.vocab_size >= 64, "data.vocab_size must be >= 64")
    p = cfg.parallel
    check(p.tp >= 1, "parallel.tp must be >= 1")
    check(p.timeout_s > 0, "parallel.timeout_s must be > 0")
    if p.tp > 1:
        problems.extend(_tensor_parallel_problems(cfg))
    if world_size is not None:
        check(world_size % p.tp == 0,
              f"world size {world_size} is not divisible by parallel.tp ({p.tp}); launch a multiple of "
              f"{p.tp} ranks (data-parallel degree = world size / tp)")
    check(cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0")
    check(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last must be >= 0")
    check(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every must be >= 0")
    check(cfg.checkpoint.max_failures >= 1, "checkpoint.max_failures must be >= 1")
    check(cfg.logging.every >= 1, "logging.every must be >= 1")
    check(bool(cfg.run.dir), "run.dir must be set")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _tensor_parallel_problems(cfg: Config) -> list[str]:
    """Every width that tensor parallelism splits must divide by `parallel.tp`: attention heads (each
    rank computes whole heads), MLP hidden widths (fc1 columns / fc2 rows) and the padded vocabulary
    (embedding rows, MLM logits). The padded vocabulary is a multiple of `model.vocab_pad_multiple`
    whatever the tokenizer's size, so requiring tp | vocab_pad_multiple covers every tokenizer."""
    m, tp, out = cfg.model, cfg.parallel.tp, []
    for name, tower in (("vision", m.vision), ("text", m.text), ("decoder", m.decoder)):
        if name == "decoder" and cfg.objectives.mim.weight <= 0:
            continue  # no decoder is built
        if tower.heads % tp:
            out.append(f"model.{name}.heads ({tower.heads}) must be divisible by parallel.tp ({tp}): "
                       f"each tensor-parallel rank computes whole heads")
        hidden = int(tower.width * m.mlp_ratio)
        if hidden % tp:
            out.append(f"model.{name}: MLP width {hidden} (width {tower.width} x model.mlp_ratio "
                       f"{m.mlp_ratio}) must be divisible by parallel.tp ({tp})")
    if m.vocab_pad_multiple % tp:
        out.append(f"model.vocab_pad_multiple ({m.vocab_pad_multiple}) must be divisible by parallel.tp "
                   f"({tp}) so the padded vocabulary splits evenly over tensor-parallel ranks")
    return out


def check_runtime(cfg: Config) -> None:
    """Raise one ConfigError naming every switch that asks for a kernel this machine cannot run (CUDA,
    apex, a C++ compiler). `validate` stays machine-independent (a GPU run's config still loads on a
    laptop for eval or planning); the engine builder calls this on the machine that trains.
    `optim.impl=auto` never fails here."""
    from parallel.optimizers import optimizer_problem
    from pretrain.models.layers import fused_layer_norm_problem

    problems = []
    problem = optimizer_problem(cfg.optim.impl)
    if problem:
        problems.append(problem)
    if cfg.model.fused_layernorm:
        problem = fused_layer_norm_problem()
        if problem:
            problems.append(f"model.fused_layernorm=true: {problem}; set model.fused_layernorm=false")
    if problems:
        raise ConfigError("config cannot run on this machine:\n  - " + "\n  - ".join(problems))


def get_key(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# ------------------------------------------------------------------------------ documentation
def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_help(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, docstring) for every leaf key, in declaration order."""
    rows = []
    docs = _attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(field_help(tp, prefix + f.name + "."))
        else:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            if typing.get_origin(tp) is list:
                tname = f"list[{typing.get_args(tp)[0].__name__}]"
            rows.append((prefix + f.name, tname, getattr(default, f.name), docs.get(f.name, "")))
    return rows


def markdown_reference() -> str:
    """The README's configuration table: every key, its type, default and docstring."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, doc in field_help():
        lines.append(f"| `{key}` | {tname} | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
