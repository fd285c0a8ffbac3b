"""The optimizer and parallelism sections of the run configuration (`optim.*`, `parallel.*`, owned here
and composed into `pretrain.config`) and `EngineSpec`, everything the DeepSpeed engine is built from,
so this package never imports `pretrain`."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name pattern (fnmatch, matched against the single-device
    model's names, e.g. `text.*`; `pretrain config` shows them): each matching parameter trains at
    `optim.lr` x the multiplier through warm-up and decay (its own optimizer group). A parameter matched
    by several patterns takes the first one written; a pattern that matches nothing, or only parameters an
    earlier pattern or `train.freeze` took, is an error. On the command line give the whole mapping:
    `'optim.lr_mult={text.*: 0.1, logit_scale: 0}'` (`{}` clears it). 0 keeps Adam state but never moves
    the weights; `train.freeze` drops the optimizer state too."""


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
    biases and norms; 0 partitions everything; -1 derives it from the model: 10 x the widest tower's
    width, DeepSpeed's own `auto` rule)."""
    prefetch_bucket_size: int = 0
    """ZeRO-3 `stage3_prefetch_bucket_size` in elements; 0 derives it from the model: the larger of 0.9 x
    width^2 of the widest tower (DeepSpeed's `auto` rule) and the parameter count up to 5e7 (DeepSpeed's
    default): a small model is prefetched whole, never in many small gathers."""
    reduce_bucket_size: int = 0
    """ZeRO `reduce_bucket_size` in elements; 0 derives it: the larger of width^2 of the widest tower
    (DeepSpeed's `auto` rule) and the parameter count up to 5e8 (DeepSpeed's default)."""
    max_live_parameters: int = 0
    """ZeRO-3 `stage3_max_live_parameters` and `stage3_max_reuse_distance` in elements; 0 derives them: the
    larger of DeepSpeed's default 1e9 and this TP rank's parameter count, so that the parameters gathered
    in forward stay live through backward instead of being gathered again (costs one gathered copy of
    the model in memory; `pretrain plan --comm` counts the traffic either way)."""
    zero_hpz: int = 1
    """ZeRO++ hierarchical partitioning (`zero_hpz_partition_size`): ZeRO-3 keeps a secondary copy of the
    parameters partitioned over groups of this many data-parallel ranks (the GPUs of one node), so the
    backward all-gather stays inside the node. 1: off. Must divide the data-parallel degree."""
    zero_quantized_weights: bool = False
    """ZeRO++ qwZ: ZeRO-3 parameter all-gathers in int8 blocks (`zero_quantized_weights`; CUDA only)."""
    zero_quantized_gradients: bool = False
    """ZeRO++ qgZ: ZeRO-3 gradient reduce-scatter in int4 through all-to-all (`zero_quantized_gradients`;
    CUDA only)."""


@dataclass(frozen=True)
class EngineSpec:
    """What `parallel.engine.build_engine` needs: made by `pretrain.config.engine_spec(cfg)`."""

    optim: OptimConfig
    """`optim.*`: AdamW implementation and hyper-parameters, learning-rate schedule."""
    parallel: ParallelConfig
    """`parallel.*`: ZeRO stage, persistence threshold."""
    steps: int
    """`train.steps`: length of the cosine schedule."""
    micro_batch: int
    """`train.micro_batch`."""
    grad_accum: int
    """`train.grad_accum`."""
    grad_clip: float
    """`train.grad_clip` (0 disables)."""
    precision: str
    """`train.precision`: bf16, fp16, fp32 or bf16_autocast."""
    seed: int
    """`train.seed`: seeds the per-tensor-parallel-rank dropout stream."""
    fp16_initial_scale_power: int = 16
    """`train.fp16_initial_scale_power`: fp16 dynamic loss scaling starts at 2^this."""
    hidden: int = 0
    """The widest tower's width (`model.vision.width`, `model.text.width`): ZeRO's bucket sizes are
    derived from it (`parallel.engine.zero3_tuning`); 0 keeps DeepSpeed's defaults."""
    compile_model: bool = False
    """`train.compile` with `train.compile_scope=model`: compile the engine's whole module (forward and
    losses) through DeepSpeed's `engine.compile()` once the engine exists."""


@dataclass
class CrossSiteConfig:
    sites: int = 0
    """Sites training this model together (DiLoCo-style outer loop, docs/cross_site.md). 0 or 1: off, the run
    is an ordinary single job. A site is a whole ordinary job (any launcher, ZeRO-3) that reads only its own
    shards; sites exchange parameter changes every `cross_site.every` steps, never data."""
    site: str = ""
    """This site's name (any unique string, e.g. `eu` or `"0"`): keys in the rendezvous store, log lines and
    which site is dropped are named by it. `pretrain launch --site NAME` sets it. One live process per name:
    a second one is refused (a requeued site takes over its crashed process's name); setting it while
    `sites` is 0 or 1 is a config error."""
    rendezvous: str = ""
    """HOST:PORT of the TCP store the sites meet at. Rank 0 of the first site whose host owns that address
    serves it, unless a store already answers there (`pretrain launch --serve-rendezvous HOST:PORT` runs one
    that outlives any site). `pretrain launch --rendezvous HOST:PORT` sets it."""
    every: int = 100
    """H: inner optimizer steps between outer rounds. Every site must use the same value (checked when a
    site joins)."""
    outer_lr: float = 1.0
    """Learning rate of the outer SGD step on the averaged pseudo-gradient. 1.0 with momentum 0 (the default)
    is plain parameter averaging every `every` steps; DiLoCo's 0.7 with Nesterov 0.9 suits long runs that
    start from a trained model: from scratch, `pretrain bench cross-site` (the demo, 2 sites, H=20, int8)
    measured zero-shot 0.272 with 0.7/0.9 against 0.406 with averaging (docs/benchmarks.md)."""
    outer_momentum: float = 0.0
    """Nesterov momentum of the outer step (0: none; DiLoCo: 0.9 with `outer_lr` 0.7)."""
    compress: str = "none"
    """Encoding of what leaves a site: `none` (fp32), `fp16`, `int8` (one fp32 scale per 1024 values), or
    `sign` (1 bit per value, its sign, and one fp32 scale per 1024 values: 0.129 bytes per value, so 7.8x
    int8's rounds on the same bytes). int8 and sign use error feedback: what rounding dropped is added to
    the next round's pseudo-gradient. On the demo (2 sites, 5 seeds), `every=3` with `sign` put 71x fewer
    bytes per sample on the link than data parallelism and trailed the synchronous job by 3.4 zero-shot
    points on average, against 5.6 for `every=20` with int8 on 1.15x its link bytes (docs/benchmarks.md)."""
    dp_clip: float = 0.0
    """Clip each site's pseudo-gradient (all of the model: all ranks' partitions) to this L2 norm every round,
    before it is encoded (0: no clipping). Needed for `cross_site.dp_noise`, whose sensitivity it is. Without
    noise it bounds what leaves the site each round only with compress `none` (fp16: up to its rounding):
    int8 and sign also send what their rounding held back in earlier rounds (error feedback), so one round's
    payload can exceed dp_clip; what they bound is the running sum: after k rounds, the norm of everything
    the site has sent is <= k x dp_clip + the norm of the residual it still holds (docs/cross_site.md)."""
    dp_noise: float = 0.0
    """Gaussian noise multiplier: each site adds N(0, (dp_noise x dp_clip)^2) to every value it sends
    (0: off), drawn from a fresh secret each release that is never stored or sent, so nobody else can
    regenerate the noise and subtract it. Epsilon per round and in total (site-level, not sample-level) from
    opacus's RDP accountant goes to the log and metrics.jsonl. Resuming at another value than the
    checkpoint's, after rounds were released, is refused (epsilon prices every round at one noise)."""
    dp_delta: float = 1e-5
    """Delta of the reported (epsilon, delta) guarantee."""
    timeout_s: int = 120
    """Seconds to wait for the rendezvous (an unreachable one fails after this, naming the address), for
    other sites at each round (a site that has not delivered by then is dropped for that round) and for a
    survivor's outer state when rejoining, and for any one operation on the store (a store that accepts but
    does not answer, e.g. a frozen host, fails after this, naming the address). Must exceed the time `every`
    steps take on the slowest site and the time one payload takes on the link, and stay below
    `parallel.timeout_s`."""
    secret_file: str = ""
    """A file holding a secret shared by every site (at least 16 bytes, e.g. `openssl rand -hex 32`; the
    same file content everywhere, never in the store). With it, every value a site writes to the rendezvous
    store (payloads, outer states handed to a rejoining site, members, digests, the fingerprint) carries an
    HMAC-SHA256 over its key and bytes, checked before use: a value written by anyone else who reaches the
    store's port is refused, naming the key. Empty: unsigned, so the store's port must be reachable only by
    the sites (a private network, a VPN or an SSH/TLS tunnel; docs/cross_site.md). Signing does not encrypt:
    what crosses the link can still be read by whoever sees it."""
