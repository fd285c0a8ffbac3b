"""The joint pretraining model: CLIP towers + MAE decoder + MLM head, with every loss inside forward.

Losses live in `forward` because ZeRO-3 gathers partitioned parameters only inside module calls; a
loss computed by the training loop from returned features could not touch e.g. the decoder. All
cross-rank communication is inside `contrastive_loss`; the rest reads like single-device code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.clip_tokenizer import CLIP_SPEC, ClipTokenizer
from data_pipelines.tokenizer import EOS_ID, PAD_ID, TextTokenizer
from parallel.groups import get_data_parallel_group
from pretrain.config import Config, ModelConfig, ObjectivesConfig
from pretrain.models.decoder import MAEDecoder
from pretrain.models.heads import MLMHead
from pretrain.models.text import TextTower
from pretrain.models.vision import VisionTower
from pretrain.objectives import contrastive_loss, feature_mim_loss, mim_loss, mlm_loss

SIGLIP_INIT_BIAS = -10.0
"""SigLIP's initial logit bias: with ~B negatives per positive, starting near log(1/B) keeps the first
steps from being dominated by pushing every negative down."""


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round the tokenizer's vocabulary up so the embedding table splits evenly (tensor parallelism)."""
    return -(-vocab_size // multiple) * multiple


class PretrainModel(nn.Module):
    """CLIP towers + MAE decoder + MLM head. Build it with `from_config`; `pretrain.parallelize` then
    prepares it for training (tensor parallelism, activation checkpointing, kernels, compile)."""

    def __init__(self, model_cfg: ModelConfig, obj_cfg: ObjectivesConfig, vocab_size: int, pad_id: int = 0,
                 eos_id: int = 3, pool_type: str = "eos"):
        super().__init__()
        m, o = model_cfg, obj_cfg
        self.model_cfg, self.obj_cfg = m, o
        self.vocab_size = padded_vocab_size(vocab_size, m.vocab_pad_multiple)
        self.pad_id, self.eos_id = pad_id, eos_id
        common = dict(mlp_ratio=m.mlp_ratio, act=m.activation, dropout=m.dropout,
                      attn_dropout=m.attention_dropout)
        v, t, d = m.vision, m.text, m.decoder
        self.visual = VisionTower(m.image_size, v.patch_size, v.width, v.layers, v.heads, m.embed_dim,
                                  **common)
        self.text = TextTower(self.vocab_size, t.context_length, t.width, t.layers, t.heads, m.embed_dim,
                              eos_id=eos_id, pad_id=pad_id, pool_type=pool_type, **common)
        # objectives with weight 0 get no modules at all: no parameters, no optimizer state
        out_dim = v.width if o.mim.target == "features" else None  # features: predict the encoder's tokens
        self.decoder = (MAEDecoder(self.visual.grid_size, v.patch_size, v.width, d.width, d.layers, d.heads,
                                   **common, out_dim=out_dim) if o.mim.weight > 0 else None)
        self.mlm_head = MLMHead(t.width, self.vocab_size) if o.mlm.weight > 0 else None
        # shape [1], not CLIP's 0-dim: DeepSpeed's start-up broadcast views every parameter as bytes,
        # which a 0-dim tensor refuses; exporters reshape it to a scalar
        self.logit_scale = nn.Parameter(torch.empty(1))
        # SigLIP's learned bias, only when that loss is selected (InfoNCE models keep their state dict)
        self.logit_bias = nn.Parameter(torch.empty(1)) if o.contrastive.loss == "siglip" else None
        self.unmasked_tail = False  # set per step by the training loop (`set_unmasked_tail`)
        self.init_weights()

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: TextTokenizer | ClipTokenizer | None = None,
                    vocab_size: int | None = None) -> PretrainModel:
        """The one way to build the model of a run: `cfg.model` and `cfg.objectives`, with the vocabulary
        and special ids of `tokenizer` (or, without one, `vocab_size` and our tokenizer's fixed ids; the
        default is `data.vocab_size`, for planning and benchmarks; `data.tokenizer=clip` needs no file, so
        its ids are used then)."""
        if tokenizer is None and cfg.data.tokenizer == CLIP_SPEC:
            tokenizer = ClipTokenizer()
        if tokenizer is not None:
            return cls(cfg.model, cfg.objectives, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                       eos_id=tokenizer.eos_id, pool_type=tokenizer.pool_type)
        return cls(cfg.model, cfg.objectives, vocab_size=vocab_size or cfg.data.vocab_size, pad_id=PAD_ID,
                   eos_id=EOS_ID)

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation for the towers (MAE's for the decoder, BERT's for the MLM head); every
        parameter is redrawn, so `torch.manual_seed(s); model.init_weights()` fully determines it."""
        self.visual.init_weights()
        self.text.init_weights()
        if self.decoder is not None:
            self.decoder.init_weights()
        if self.mlm_head is not None:
            self.mlm_head.init_weights()
        self.logit_scale.fill_(min(math.log(1.0 / self.obj_cfg.contrastive.init_temperature),
                                   self.logit_scale_ceiling))
        if self.logit_bias is not None:
            self.logit_bias.fill_(SIGLIP_INIT_BIAS)

    @property
    def logit_scale_ceiling(self) -> float:
        """log(`objectives.contrastive.max_logit_scale`): the training loop clamps `logit_scale` to this after
        every optimizer step (`parallel.engine.clamp_parameter_`)."""
        return math.log(self.obj_cfg.contrastive.max_logit_scale)

    def set_unmasked_tail(self, on: bool) -> None:
        """The training loop's switch for `objectives.mim.unmasked_tail_steps`: while on, training
        forwards run the contrastive loss on full images and skip the MAE loss."""
        self.unmasked_tail = bool(on)

    def contrastive_mask_ratio(self) -> float:
        """Fraction of patches the contrastive pass hides in the next forward (0 in eval mode, in the
        unmasked tail and with separate views)."""
        o = self.obj_cfg
        if not self.training or self.unmasked_tail or (not o.mim.shared_pass and o.mim.weight > 0):
            return 0.0
        return o.mim.mask_ratio

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted total loss plus each enabled loss (detached, for logging) and the logit scale.

        Training: one encoder pass over the visible patches (mask ratio `objectives.mim.mask_ratio`,
        noise `batch["patch_noise"]`) feeds both the contrastive loss and the decoder (FLIP + MAE);
        with `objectives.mim.shared_pass=false` the contrastive loss has its own pass over every patch.
        In the unmasked tail (`set_unmasked_tail`) the contrastive pass sees every patch and the MAE
        loss is skipped. Eval mode: the contrastive loss sees every patch, as retrieval does; the MIM
        loss then needs its own masked pass.
        """
        o = self.obj_cfg
        use_con, use_mim, use_mlm = o.contrastive.weight > 0, o.mim.weight > 0, o.mlm.weight > 0
        if self.training and self.unmasked_tail:
            use_mim = False
        losses: dict[str, torch.Tensor] = {}
        images = batch["image"]  # [B, 3, S, S]
        ratio = self.contrastive_mask_ratio()
        noise = batch.get("patch_noise")  # [B, N]
        features_target = use_mim and o.mim.target == "features"
        pooled = tokens = mask = ids_restore = None
        if use_con or (use_mim and ratio > 0) or features_target:
            pooled, tokens, mask, ids_restore = self.visual.forward_features(images, noise, ratio)
        full_tokens = tokens if ratio == 0 else None  # [B, 1 + N, W]: the target of target=features

        # no clamp here (it would zero the gradient above the ceiling, where Adam's momentum can carry the
        # parameter and leave it stuck): the training loop clamps the parameter after each step, as CLIP does
        scale = self.logit_scale.exp().squeeze(0)  # []
        if use_con:
            txt = self.text(batch["text"], causal=True)  # [B, E], pooled at EOS
            c = o.contrastive
            bias = self.logit_bias.squeeze(0) if self.logit_bias is not None else None
            losses["loss_contrastive"] = contrastive_loss(pooled, txt, scale, group=get_data_parallel_group(),
                                                          loss=c.loss, chunk=c.chunk, logit_bias=bias)
        if use_mim:
            if ratio == 0:  # eval / separate views: the pass above saw every patch, MAE needs a masked one
                _, tokens, mask, ids_restore = self.visual.forward_features(images, noise, o.mim.mask_ratio)
            pred = self.decoder(tokens, ids_restore)  # [B, N, p*p*3], or [B, N, W] for features
            if features_target:  # what the full view made of each masked patch, stop-gradient
                losses["loss_mim"] = feature_mim_loss(pred, full_tokens[:, 1:], mask)
            else:
                losses["loss_mim"] = mim_loss(pred, images, mask, self.visual.patch_size, o.mim.norm_pix_loss,
                                             o.mim.norm_pix_eps)
        if use_mlm:
            hidden = self.text.forward_tokens(batch["mlm_input"], causal=False)  # [B, L, W]
            losses["loss_mlm"] = mlm_loss(self.mlm_head(hidden), batch["mlm_labels"],
                                          group=get_data_parallel_group())

        weights = {"loss_contrastive": o.contrastive.weight, "loss_mim": o.mim.weight,
                   "loss_mlm": o.mlm.weight}
        total = sum(weights[k] * v for k, v in losses.items())
        out = {"loss": total}
        out.update({k: v.detach() for k, v in losses.items()})
        out["logit_scale"] = scale.detach().float()
        return out

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> L2-normalised fp32 embeddings [B, E], every patch seen."""
        return F.normalize(self.visual(images).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> L2-normalised fp32 embeddings [B, E] from the causal pass."""
        return F.normalize(self.text(ids).float(), dim=-1)
