"""Typed run configuration: one dataclass per concern, every field with a docstring under it.

The docstrings are read back by `reference.field_help` (so `pretrain config --keys` and the README's
table come from one source); `loading` turns YAML + dotted overrides into these classes and
`validation` checks them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipelines.settings import DataConfig
from parallel.settings import CrossSiteConfig, OptimConfig, ParallelConfig
from pretrain.config.objectives import (  # noqa: F401 (re-exported: pretrain.config.schema.ITMConfig)
    ContrastiveConfig,
    ITMConfig,
    MIMConfig,
    MLMConfig,
    ObjectivesConfig,
)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------- sections
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
    block_init: str = "scaled"
    """How the image tower's blocks start. "scaled": OpenAI CLIP's text-tower init (std W^-0.5 for QKV,
    smaller for the projections into the residual stream, by depth). "pytorch": the layers' own defaults,
    which is what OpenAI's and open_clip's ViT blocks get (`init_parameters` leaves them alone)."""


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
class FusionConfig:
    layers: int = 0
    """Blocks of the cross-modal fusion encoder (0: off -- no fusion parameters, same model and losses as
    without it). Each block: bidirectional self-attention over the caption's text-tower tokens, cross-
    attention to the image tower's tokens, MLP; it serves `objectives.itm` and `objectives.mlm.conditioned`
    and `pretrain eval --rerank`. It attends to the image tokens of the contrastive pass: every patch with
    separate views (`objectives.mim.shared_pass: false`) and in eval, the visible patches under a shared
    masked pass (FLIP)."""
    width: int = 0
    """Width of the fusion blocks (0: the text tower's width)."""
    heads: int = 4
    """Attention heads of the fusion blocks (self and cross); must divide the fusion width."""
    text_positions: bool = False
    """Add a learned position embedding (one row per `model.text.context_length` position) to the fusion
    encoder's text input. Its self-attention is bidirectional and has no positions of its own, so without
    them word order reaches it only through the causal text pass's states; binding words to image regions
    ("red ... left of ... blue") needs the order. Off: no extra parameter, same model as before. Measured in
    `pretrain bench fusion` (docs/benchmarks.md, #20): no change in binding at 3,000 steps, one seed."""
    image_positions: bool = False
    """Add a learned position embedding (one row per image token: CLS and every patch, gathered for the
    visible patches under FLIP) to the image tokens the fusion encoder attends to. The tower's own positions
    enter at its input and fade through its blocks; a spatial relation in the caption ("red circle left of
    blue square") is read from where the matching patches are. Off: no extra parameter, same model as
    before. Measured (docs/benchmarks.md, #20): a fresh fusion encoder on frozen towers learns the relation
    sooner with them; the joint 10,000-step bench run did not learn the relation with or without them."""


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
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Cross-modal fusion encoder (ALBEF/BLIP-style), off by default."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to run."""
    micro_batch: int = 32
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch x grad_accum x dp. Not a
    bigger batch for the in-batch losses: each micro-batch is its own contrastive (InfoNCE) loss over
    micro_batch x dp samples, and ITM draws its hard negatives from those, so accumulation adds samples per
    step, not negatives (a warning at start-up says so)."""
    precision: str = "bf16"
    """Numeric precision: bf16 (bf16 params, fp32 master weights), fp16 (dynamic loss scaling), fp32, or
    bf16_autocast (fp32 params and master weights, bf16 compute under torch.autocast; DeepSpeed's
    `torch_autocast`)."""
    fp16_initial_scale_power: int = 16
    """fp16 only: dynamic loss scaling starts at 2^this (DeepSpeed's `initial_scale_power`). A step whose
    scaled gradients overflow is skipped and the scale halved, so a too-high start costs a few skipped steps
    at the beginning (small models with large gradients); lower it to start nearer the scale they fit."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seed for initialisation, shuffling, augmentation and masking."""
    activation_checkpointing: bool = False
    """Recompute transformer blocks in backward instead of storing their activations."""
    global_batch: int = 0
    """Expected global batch (micro_batch x grad_accum x data-parallel ranks); 0 derives it. Set it in
    recipes so a launch with the wrong rank count fails before training instead of silently training on a
    different number of samples per step. It checks the sample count only: trading data-parallel ranks
    for `grad_accum` keeps it but shrinks the contrastive loss's negatives (micro_batch x dp); keep
    micro_batch x dp for the same objective."""
    nonfinite_patience: int = 3
    """A micro-batch whose loss is NaN/inf never reaches the weights and is counted; this many in a row
    stop the run with the step and the objective that went non-finite. Under ZeRO 1-3 its optimizer step
    is skipped and the count is checked at log steps (no read in between); under ZeRO 0 the micro-batch is
    dropped at once and replaced (pretrain/nonfinite.py)."""
    stop_check_every: int = 0
    """How often (in optimizer steps) the ranks agree on a stop request (SIGUSR1/SIGTERM), which costs a
    collective and a read; 0: at log steps (`logging.every`). The run stops, checkpoints and exits 75 at
    the first check after the signal, so keep `logging.every` x step time (or this x step time) well under
    the scheduler's warning (`--signal=USR1@120`: 120 s). Must be <= `train.steps` (else no step checks)."""
    compile: bool = False
    """torch.compile the model (what: `train.compile_scope`); the first steps are slow while it compiles
    (inductor; on CPU it needs a C++ compiler)."""
    compile_scope: str = "blocks"
    """What `train.compile=true` compiles. `blocks`: each transformer block on its own (`nn.Module.compile`
    in `pretrain/parallelize.py`). `model`: the whole forward pass, embeddings, towers, decoder, heads and
    losses, through DeepSpeed's `engine.compile()` once the engine exists, so inductor also fuses what lies
    between and around the blocks (patch masking, pooling, projections, the loss arithmetic). Under ZeRO-3
    each parameter gather (a DeepSpeed hook) and each collective still breaks the graph; compile time is
    longer and every new input shape (an eval batch, the unmasked tail) compiles again."""
    fp8: bool = False
    """fp8 matmuls in the transformer blocks' linear layers (torchao's float8 training: e4m3 inputs and
    weights, e5m2 gradients, dynamic per-tensor scales; everything else stays bf16): for H100/H200-class
    GPUs (compute capability >= 8.9), whose fp8 tensor cores run them at twice the bf16 rate. Needs
    `train.precision=bf16`, `parallel.tp=1` (megatron-core's parallel layers are not `nn.Linear`) and
    torchao (`pip install torchao`); layers whose sizes are not multiples of 16 stay bf16. On a CPU it runs
    emulated (slow: for tests). Parameter names and checkpoints are unchanged."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch, matched against the single-device model's names, the same at
    every `parallel.tp`) to freeze: no gradient, no optimizer state (no fp32 master, no Adam moments under
    any ZeRO stage), never changed, still saved in checkpoints. `[visual.*]` locks the image tower (LiT);
    `pretrain plan` counts the saving. A pattern that matches no parameter is an error listing real names."""
    task: str = "pretrain"
    """What the run optimizes. `pretrain`: the CLIP + MAE + MLM objectives. `classify`: fine-tune the image
    tower with a linear head initialised from the zero-shot classifier on the `.cls` labels of `data.train`
    (`pretrain finetune`; needs `finetune.classnames`; the text tower is dropped, `objectives.*` unused)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end of training)."""
    dir: str = ""
    """Checkpoint directory (default: RUN_DIR/checkpoints)."""
    keep_last: int = 0
    """Keep only the N most recently saved complete checkpoints (0 keeps all). Never deletes the one `latest`
    names."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of K, whatever `keep_last` says (0: none)."""
    keep_best: str = ""
    """Also keep the checkpoint with the best value of this validation metric (e.g. `val/zeroshot_top1`,
    `val/i2t_r1`, `val/loss`: losses lower is better, the rest higher), named in `<dir>/best.json`. Needs
    `eval.every` with `checkpoint.every` a multiple of it, or `eval.at_end`; and some checkpoint step must
    be validated (`eval.at_end`, or `train.steps` or a `checkpoint.every` step <= it a multiple of
    `eval.every`), else the config is refused. Empty: off."""
    max_failures: int = 3
    """A failed save (full or unwritable disk) is reported and training goes on from memory; this many
    failures in a row stop the run. The final save must succeed."""
    universal: bool = False
    """Also write each checkpoint in the layout-free universal format (`<dir>/universal/<tag>`: full fp32
    weights and Adam moments per parameter, with TP split metadata), which `--resume` loads under any
    other data-/tensor-parallel layout. Same as `pretrain convert SRC DST --to universal` afterwards; without
    it, a resume at another layout writes the one copy it needs then."""


@dataclass
class EvalConfig:
    every: int = 0
    """Validate on `data.val` every N optimizer steps inside the training job, on all ranks at the same step
    (0: never during training). Writes `val/...` rows to metrics.jsonl and TensorBoard."""
    at_end: bool = False
    """Also validate after the last step (before the final checkpoint, so `checkpoint.keep_best` sees it)."""
    max_samples: int = 1000
    """Validate on the first N samples of `data.val` in shard order (0: all). Losses, zero-shot and
    retrieval all use this set; recall@k over more pairs is harder, so keep N fixed to compare runs."""
    classnames: str = ""
    """classnames.txt for zero-shot validation (`.cls` of each sample indexes it). Empty: a classnames.txt
    beside the first `data.val` shard if there is one, else no zero-shot (losses and retrieval only)."""
    batch_size: int = 0
    """Samples per rank per validation forward (0: `train.micro_batch`)."""
    seed: int = 1234
    """Seed of the validation masks (MAE patch noise, MLM tokens): the same masks at every validation and in
    every layout, so the validation losses of different steps and runs compare."""


@dataclass
class FinetuneConfig:
    classnames: str = ""
    """`train.task=classify`: the classnames.txt the `.cls` labels index (one class per line); the head has
    one row per class, initialised from the zero-shot classifier of these names."""
    templates: str = ""
    """`train.task=classify`: prompt templates for the zero-shot head, one per line with `{}` or `{c}`.
    Empty: zeroshot_classification_templates.txt beside `finetune.classnames` if there is one (what
    `pretrain eval` reads for those shards), else the built-in prompts."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Write metrics every N optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under RUN_DIR/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    all_ranks: bool = False
    """Log INFO lines on every rank. By default ranks > 0 log only warnings and errors (DeepSpeed's logger
    too): every rank runs the same code, so their INFO lines repeat rank 0's."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation during training on `data.val`."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Task fine-tuning (`train.task`, `pretrain finetune`)."""
    cross_site: CrossSiteConfig = field(default_factory=CrossSiteConfig)
    """Training across sites that share only model updates (DiLoCo outer loop), off by default."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard, progress bar, which ranks log."""
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""


# ----------------------------------------------------------------------------------- choices
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.activation": ("gelu", "quick_gelu"),
    "model.attention": ("sdpa", "math"),
    "optim.schedule": ("cosine", "constant"),
    "optim.impl": ("auto", "torch", "torch_fused", "deepspeed_fused", "apex_fused", "cpu_adam"),
    "objectives.contrastive.loss": ("infonce", "siglip"),
    "objectives.mim.mask_layout": ("random", "spread"),
    "model.vision.block_init": ("scaled", "pytorch"),
    "train.precision": ("bf16", "fp16", "fp32", "bf16_autocast"),
    "train.compile_scope": ("blocks", "model"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "train.task": ("pretrain", "classify"),
    "cross_site.compress": ("none", "fp16", "int8", "sign"),  # parallel.cross_site_codec.CODECS
}
