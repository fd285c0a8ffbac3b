"""The objectives' sections of the run configuration (`objectives.*`): which losses train the model and how.

Split from `schema` (which imports them back, so `pretrain.config.schema.ITMConfig` still works) to keep
each module short; every field has its docstring under it, read by `reference.field_help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Fraction of patches hidden from the image encoder in the masked pass: the MAE decoder's input,
    and with `shared_pass: true` also the contrastive loss's (FLIP: faster, at a cost in zero-shot
    accuracy); with a contrastive-only recipe (`weight: 0`) it is FLIP's ratio. 0 keeps all patches."""
    norm_pix_loss: bool = True
    """Reconstruct per-patch normalised pixels (MAE's better-representation setting)."""
    norm_pix_eps: float = 1.0e-6
    """Added to each target patch's pixel variance before dividing by its square root (`norm_pix_loss`).
    MAE's 1e-6 suits photos; on flat patches (rendered or scanned images, white product backgrounds)
    it blows JPEG noise up to unit-variance targets nothing can predict. A floor like 1e-2 (in
    normalised-pixel units) leaves textured patches as they were and flat ones near zero."""
    target: str = "pixels"
    """What the decoder predicts at the masked patches. "pixels": MAE's (normalised, `norm_pix_loss`)
    pixels. "features": the contrastive pass's own output tokens for the same image with every patch
    seen, stop-gradient and layer-normed (masked feature prediction, as MaskCLIP/data2vec, with the online
    encoder as its own teacher): the masked view learns to infer what the full view represents, which
    pulls in the direction of the contrastive loss instead of toward pixel detail. Needs
    `shared_pass: false` (that full pass is the target) and costs no extra encoder pass then."""
    shared_pass: bool = False
    """False (default since issue #14): separate views, the contrastive loss gets its own pass over every
    patch (the view zero-shot and retrieval see) and MAE its masked pass; costs one more (partial)
    encoder pass per step. True: one pass over the visible patches (`mask_ratio`) feeds both the
    contrastive loss and the decoder (FLIP + MAE): cheapest, but `pretrain bench quality` measured it
    far behind contrastive-only in zero-shot (docs/benchmarks.md). Only matters when both are on."""
    mask_layout: str = "random"
    """Which patches a masked pass hides. "random": MAE's and FLIP's uniform draw per image. "spread":
    the same draw ranked within each 2x2 block of patches, so every block keeps its share (two of four
    at 50%): no region, e.g. a small object the caption names, is hidden whole by chance (needs an
    even number of patches per side)."""
    unmasked_tail_steps: int = 0
    """The last N optimizer steps train the contrastive loss on full images (FLIP's unmasking tuning),
    closing the gap between masked training and unmasked evaluation. The MAE loss is skipped in the
    tail (FLIP's tuning is contrastive-only, and a masked pass for it would cost an extra encoder pass
    per step). Defined by the step number, so a resume inside the tail continues unmasked. 0: off."""


@dataclass
class MLMConfig:
    weight: float = 1.0
    """Weight of the BERT-style masked-language loss (0 disables the bidirectional pass)."""
    mask_prob: float = 0.15
    """Fraction of caption tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""
    conditioned: bool = False
    """Predict the masked words through the fusion encoder, which also sees the image tokens of the
    contrastive pass (ALBEF/BLIP's image-conditioned MLM; needs `model.fusion.layers` > 0). False: the
    text tower alone, as BERT."""


@dataclass
class ITMConfig:
    weight: float = 0.0
    """Weight of the image-text matching loss (0: off). Per local pair: the positive, the image with a hard
    negative caption and the caption with a hard negative image, both drawn from the contrastive
    similarities over the whole data-parallel batch (a negative may live on another rank); binary
    cross-entropy of the fusion encoder's match head. Needs `model.fusion.layers` > 0 and the
    contrastive loss on."""
    hard_warmup_steps: int = 0
    """Curriculum for the negatives: over the first N optimizer steps the sampling scale of the draw ramps
    from 0 (negatives uniform over the batch: easy) to the contrastive logit scale (hard), by step number
    (so a resume continues the ramp). 0: hard from the first step, which kept the match loss at its
    label prior in `pretrain bench fusion` (docs/benchmarks.md, "#20 diagnosis")."""
    swap_negatives: bool = False
    """Also score each image against its own caption with two different words swapped ("blue circle left
    of red square" for "red circle left of blue square"; drawn per sample, layout-independent), labelled
    no match: a negative with the same words, which only binding words to the image can reject. Costs one
    more causal text pass over the batch and B more fusion pairs (4 B instead of 3 B)."""
    caption_negatives: bool = False
    """Also score each image against a negative caption its sample carries (`.neg.txt`: captions that do
    not describe the image, one per line, e.g. its caption with attributes swapped between objects, as
    NegCLIP builds them; `pretrain data synth --compositional` writes both swaps), labelled no match.
    Samples without one get a batch negative instead (counted as `missing_negative` in the data report
    and metrics; an unreadable `neg.txt` as `bad_negative`). Unlike `swap_negatives`, these are grammatical,
    so the text alone cannot give them away. Costs one more causal text pass and B more fusion pairs."""
    caption_negatives_per_step: int = 1
    """How many of a sample's `neg.txt` lines ITM scores at each step: lines (epoch x K + j) mod n, j < K, of
    its n lines. 1: one line per epoch in turn (each swap every n-th epoch); K = n: every line at every step
    (`data synth --compositional` writes two). Each extra line costs one more causal text pass and B more
    fusion pairs."""
    alone_steps: int = 0
    """Curriculum over the kinds of negative: for the first N optimizer steps ITM scores each image against
    its caption (match) and `neg.txt` line `alone_line` only (no match): no batch negatives, no swapped
    words, no other line. Negatives that can be rejected without knowing where an object is (another
    caption, a colour swap) trap the fusion encoder in a solution that never finds positions when they come
    from the first step, while an object swap scored alone first is learned and survives the others
    (docs/benchmarks.md, "#20: which pairs"). By step number, so a resume continues it; the
    `hard_warmup_steps` ramp starts when it ends. 0: every negative from the first step."""
    skew_phrase: str = ""
    """With `skew_steps`: the text (e.g. "left of") whose captions dominate ITM's loss in those steps. Pairs
    of samples whose caption does not contain it weigh `skew_weight`, so one reading of the captions holds
    most of the loss. Why: when captions say "A left of B" and "B right of A" equally often, whether a
    caption matches is where its first-named object is XOR its relation word, and neither alone predicts it:
    the match of an object swap then sits at chance for thousands of steps. With one relation dominant the
    first feature predicts the label, is learned, and the other relation follows (docs/benchmarks.md,
    "#20: a symmetry")."""
    skew_weight: float = 0.25
    """`skew_steps`: the ITM loss weight of the pairs of samples whose caption lacks `skew_phrase` (a weighted
    mean over the global batch; 0.25 is a share of 80 / 20 where half the captions have the phrase)."""
    skew_steps: int = 0
    """Optimizer steps, from the first, during which ITM's loss is skewed toward `skew_phrase` (by step
    number, so a resume continues it; `loss_itm` logs the weighted mean then). 0: off."""
    alone_line: int = 0
    """`alone_steps`: which of the `caption_negatives_per_step` lines scored per step goes alone (0-based).
    With every line scored at every step (`caption_negatives_per_step` = the lines per sample) it is that
    line of `neg.txt`: 1 is the object swap of `data synth --compositional` (line 0 is the colour swap)."""


@dataclass
class ObjectivesConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Contrastive image-text loss (CLIP)."""
    mim: MIMConfig = field(default_factory=MIMConfig)
    """Masked image modeling (MAE)."""
    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Masked language modeling (BERT)."""
    itm: ITMConfig = field(default_factory=ITMConfig)
    """Image-text matching through the fusion encoder (ALBEF), off by default."""
