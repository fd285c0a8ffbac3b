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
from parallel.collectives import all_gather_with_grad
from parallel.groups import get_data_parallel_group
from pretrain.config import Config, ModelConfig, ObjectivesConfig
from pretrain.models.decoder import MAEDecoder
from pretrain.models.fusion import FusionEncoder, ITMHead
from pretrain.models.heads import MLMHead
from pretrain.models.text import TextTower
from pretrain.models.vision import VisionTower, spread_noise
from pretrain.objectives import (
    contrastive_loss,
    feature_mim_loss,
    hard_negatives,
    itm_loss,
    mim_loss,
    mlm_loss,
    swap_words,
)

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
                                  block_init=v.block_init, **common)
        self.text = TextTower(self.vocab_size, t.context_length, t.width, t.layers, t.heads, m.embed_dim,
                              eos_id=eos_id, pad_id=pad_id, pool_type=pool_type, **common)
        # objectives with weight 0 get no modules at all: no parameters, no optimizer state
        out_dim = v.width if o.mim.target == "features" else None  # features: predict the encoder's tokens
        self.decoder = (MAEDecoder(self.visual.grid_size, v.patch_size, v.width, d.width, d.layers, d.heads,
                                   **common, out_dim=out_dim) if o.mim.weight > 0 else None)
        # the fusion encoder (model.fusion.layers > 0) and its match head (objectives.itm.weight > 0)
        f = m.fusion
        self.fusion_width = f.width or t.width
        # built without consuming the global RNG (init_weights draws it last), so every other parameter
        # gets the same initial values with the fusion encoder as without it
        with torch.random.fork_rng(devices=[]):
            self.fusion = (FusionEncoder(t.width, v.width, self.fusion_width, f.layers, f.heads, **common,
                                         context_length=t.context_length if f.text_positions else 0,
                                         image_tokens=1 + self.visual.num_patches if f.image_positions else 0)
                           if f.layers > 0 else None)
            self.itm_head = (ITMHead(self.fusion_width) if self.fusion is not None and o.itm.weight > 0
                             else None)
        mlm_width = self.fusion_width if o.mlm.conditioned else t.width  # conditioned: reads fused tokens
        self.mlm_head = MLMHead(mlm_width, self.vocab_size) if o.mlm.weight > 0 else None
        # shape [1], not CLIP's 0-dim: DeepSpeed's start-up broadcast views every parameter as bytes,
        # which a 0-dim tensor refuses; exporters reshape it to a scalar
        self.logit_scale = nn.Parameter(torch.empty(1))
        # SigLIP's learned bias, only when that loss is selected (InfoNCE models keep their state dict)
        self.logit_bias = nn.Parameter(torch.empty(1)) if o.contrastive.loss == "siglip" else None
        self.unmasked_tail = False  # set per step by the training loop (`set_unmasked_tail`)
        self.itm_hardness = 1.0  # set per step by the training loop (`set_itm_hardness`)
        self.itm_alone = False  # objectives.itm.alone_steps: set per step by `set_itm_hardness` too
        self.itm_skewed = False  # objectives.itm.skew_steps: likewise
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
        # last, so every other parameter draws what it draws without a fusion encoder
        if self.fusion is not None:
            self.fusion.init_weights()
        if self.itm_head is not None:
            self.itm_head.init_weights()

    @property
    def logit_scale_ceiling(self) -> float:
        """log(`objectives.contrastive.max_logit_scale`): the training loop clamps `logit_scale` to this after
        every optimizer step (`parallel.engine.clamp_parameter_`)."""
        return math.log(self.obj_cfg.contrastive.max_logit_scale)

    def set_unmasked_tail(self, on: bool) -> None:
        """The training loop's switch for `objectives.mim.unmasked_tail_steps`: while on, training
        forwards run the contrastive loss on full images and skip the MAE loss."""
        self.unmasked_tail = bool(on)

    def set_itm_hardness(self, step: int) -> None:
        """The training loop's curriculum for ITM's negatives at optimizer step `step`: one `neg.txt` line
        alone for the first `objectives.itm.alone_steps`, then the ramp of `objectives.itm.hard_warmup_steps`:
        the negatives' sampling scale is this fraction of the logit scale (0: uniform draws; 1: hard
        negatives); and the loss skewed toward `skew_phrase` for the first `skew_steps`. Eval always
        scores every negative, hard, in a plain mean."""
        itm = self.obj_cfg.itm
        self.itm_alone = step < itm.alone_steps
        self.itm_skewed = step < itm.skew_steps
        n, since = itm.hard_warmup_steps, max(0, step - itm.alone_steps)
        self.itm_hardness = 1.0 if n <= 0 else min(1.0, since / n)

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
        use_itm, conditioned = self.itm_head is not None, use_mlm and o.mlm.conditioned
        if self.training and self.unmasked_tail:
            use_mim = False
        losses: dict[str, torch.Tensor] = {}
        images = batch["image"]  # [B, 3, S, S]
        ratio = self.contrastive_mask_ratio()
        noise = batch.get("patch_noise")  # [B, N]
        if noise is not None and o.mim.mask_layout == "spread":
            noise = spread_noise(noise, self.visual.grid_size)  # [B, N]
        features_target = use_mim and o.mim.target == "features"
        pooled = tokens = mask = ids_restore = None
        if use_con or (use_mim and ratio > 0) or features_target or use_itm or conditioned:
            pooled, tokens, mask, ids_restore = self.visual.forward_features(images, noise, ratio)
        full_tokens = tokens if ratio == 0 else None  # [B, 1 + N, W]: the target of target=features
        # what the fusion encoder attends to: the contrastive pass's tokens [B, 1 + N_vis, W_img] -- the
        # visible patches under a shared masked pass (FLIP), every patch with separate views / in eval
        # (plus their learned positions with `model.fusion.image_positions`; the MAE decoder gets `tokens`)
        image_tokens = tokens
        if self.fusion is not None and tokens is not None:
            image_tokens = self.fusion.place(tokens, ids_restore)

        # no clamp here (it would zero the gradient above the ceiling, where Adam's momentum can carry the
        # parameter and leave it stuck): the training loop clamps the parameter after each step, as CLIP does
        # exp in fp32: under bf16 the parameter is bf16 (its fp32 master is the optimizer's), and a bf16 exp
        # would round the scale itself to 8 bits (14.29 -> 14.25)
        scale = self.logit_scale.float().exp().squeeze(0)  # [] fp32
        if use_con:
            if use_itm:  # the same causal pass also hands the fusion encoder its tokens [B, L, W_text]
                txt, text_tokens = self.text(batch["text"], causal=True, return_both=True)
            else:
                txt = self.text(batch["text"], causal=True)  # [B, E], pooled at EOS
            c = o.contrastive
            bias = self.logit_bias.float().squeeze(0) if self.logit_bias is not None else None
            losses["loss_contrastive"] = contrastive_loss(pooled, txt, scale, group=get_data_parallel_group(),
                                                          loss=c.loss, chunk=c.chunk, logit_bias=bias)
        if use_itm:
            losses["loss_itm"] = self._itm(pooled, txt, image_tokens, text_tokens, batch, scale)
        if use_mim:
            if ratio == 0:  # eval / separate views: the pass above saw every patch, MAE needs a masked one
                _, tokens, mask, ids_restore = self.visual.forward_features(images, noise, o.mim.mask_ratio)
            pred = self.decoder(tokens, ids_restore)  # [B, N, p*p*3], or [B, N, W] for features
            if features_target:  # what the full view made of each masked patch, stop-gradient
                losses["loss_mim"] = feature_mim_loss(pred, full_tokens[:, 1:], mask)
            else:
                losses["loss_mim"] = mim_loss(pred, images, mask, self.visual.patch_size, o.mim.norm_pix_loss,
                                             o.mim.norm_pix_eps)
        if use_mlm:  # conditioned: the masked caption also sees the image tokens
            logits = self._mlm_logits(batch["mlm_input"], image_tokens)  # [B, L, V]
            losses["loss_mlm"] = mlm_loss(logits, batch["mlm_labels"], group=get_data_parallel_group())

        weights = {"loss_contrastive": o.contrastive.weight, "loss_mim": o.mim.weight,
                   "loss_mlm": o.mlm.weight, "loss_itm": o.itm.weight}
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

    def _itm(self, img: torch.Tensor, txt: torch.Tensor, image_tokens: torch.Tensor,
             text_tokens: torch.Tensor, batch: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        """ALBEF's image-text matching on this rank's B pairs: B positives, B (image, hard negative
        caption) and B (hard negative image, caption) pairs through the fusion encoder, scored by the
        match head. Negatives come from the whole data-parallel batch; how their tokens get here is in
        `pretrain/objectives/itm.py`. In training steps before `objectives.itm.alone_steps`: the B positives
        and one `neg.txt` line's B pairs only (the same passes on every rank: the switch is by step)."""
        group = get_data_parallel_group()
        ids = batch["text"]  # [B, L]
        uniform = batch.get("itm_noise") if self.training else None  # [B, 2]; eval: hardest negative
        hardness = self.itm_hardness if self.training else 1.0  # `objectives.itm.hard_warmup_steps`
        neg_txt, neg_img, ids_all = hard_negatives(img, txt, ids, scale.detach() * hardness, group, uniform)
        alone = self.training and self.itm_alone  # `objectives.itm.alone_steps`: one neg.txt line, no other
        texts, text_ids, images = [text_tokens], [ids], [image_tokens]  # the B positives
        if not alone:  # + (image, hard negative caption) and (hard negative image, caption)
            text_all, _ = all_gather_with_grad(text_tokens, group)  # [B_global, L, W_text]
            image_all, _ = all_gather_with_grad(image_tokens, group)  # [B_global, S, W_img]
            texts += [text_all[neg_txt], text_tokens]  # each [B, L, W_text]
            text_ids += [ids_all[neg_txt], ids]  # each [B, L]
            images += [image_tokens, image_all[neg_img]]  # each [B, S, W_img]
        if self.obj_cfg.itm.swap_negatives and not alone:  # + (image, its caption with two words swapped)
            swapped, valid = swap_words(ids, self.text.pool_positions(ids), uniform)
            swapped = torch.where(valid[:, None], swapped, ids_all[neg_txt])  # none to swap: batch negative
            texts.append(self.text(swapped, causal=True, return_tokens=True))  # its own causal pass
            text_ids.append(swapped)
            images.append(image_tokens)
        if self.obj_cfg.itm.caption_negatives:  # + (image, a caption its sample says does not match) x K
            # K = objectives.itm.caption_negatives_per_step lines [B, L], None where the batch has none:
            # the same K passes on every rank whatever its data (ZeRO-3 gathers parameters in every forward)
            k = self.obj_cfg.itm.caption_negatives_per_step
            given, more = batch.get("neg_text"), batch.get("neg_text_more")  # [B, L], [B, K - 1, L]
            rest = list(more.unbind(1)) if given is not None and more is not None else [None] * (k - 1)
            lines = [given, *rest][:k]
            for line in [lines[self.obj_cfg.itm.alone_line]] if alone else lines:
                neg_ids = ids_all[neg_txt] if line is None else torch.where(
                    batch["has_negative"].to(ids.device)[:, None], line.to(ids.device), ids_all[neg_txt])
                texts.append(self.text(neg_ids, causal=True, return_tokens=True))  # its own causal pass
                text_ids.append(neg_ids)
                images.append(image_tokens)
        logits = self.match_logits(torch.cat(texts), torch.cat(text_ids), torch.cat(images))  # [P B, 2]
        B = ids.shape[0]
        labels = torch.cat([torch.ones(B), torch.zeros(logits.shape[0] - B)]).long().to(logits.device)
        weight = None
        if self.training and self.itm_skewed and "itm_skew" in batch:  # `objectives.itm.skew_*`
            per_sample = torch.where(batch["itm_skew"].to(logits.device), 1.0, self.obj_cfg.itm.skew_weight)
            weight = per_sample.repeat(len(texts))  # [P B]: every pair weighs what its anchor sample does
        return itm_loss(logits, labels, weight, group)

    def match_logits(self, text_tokens: torch.Tensor, ids: torch.Tensor, image_tokens: torch.Tensor
                     ) -> torch.Tensor:
        """Fusion encoder + match head: text tokens [N, L, W_text] of captions `ids` [N, L] (the causal
        pass's hidden states) with image tokens [N, S, W_img] -> match logits [N, 2] (1 = match), read
        at each caption's pool position (its EOS: the token that summarises it)."""
        fused = self.fusion(text_tokens, image_tokens, self.text.padding_mask(ids))  # [N, L, W_fusion]
        pos = self.text.pool_positions(ids)  # [N]
        return self.itm_head(fused[torch.arange(ids.shape[0], device=ids.device), pos])

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> the image tokens the fusion encoder reads [B, 1 + N, W_img], every patch."""
        _, tokens, _, ids_restore = self.visual.forward_features(images)
        return tokens if self.fusion is None else self.fusion.place(tokens, ids_restore)

    @torch.no_grad()
    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> the causal pass's hidden states [B, L, W_text] (the fusion encoder's text input)."""
        return self.text(ids, causal=True, return_tokens=True)

    @torch.no_grad()
    def mlm_logits(self, mlm_input: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`_mlm_logits` without gradients: what the binding probe's relation test reads (`image_tokens` from
        `image_tokens`)."""
        return self._mlm_logits(mlm_input, image_tokens)

    def _mlm_logits(self, mlm_input: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """A masked caption [B, L] -> the MLM head's logits [B, L, V]; with `objectives.mlm.conditioned` the
        caption goes through the fusion encoder with the image tokens [B, 1 + N_vis, W_img]."""
        hidden = self.text.forward_tokens(mlm_input, causal=False)  # [B, L, W_text]
        if self.obj_cfg.mlm.conditioned:
            hidden = self.fusion(hidden, image_tokens, self.text.padding_mask(mlm_input))  # [B, L, W_fusion]
        return self.mlm_head(hidden)

    @torch.no_grad()
    def itm_score(self, text_tokens: torch.Tensor, ids: torch.Tensor, image_tokens: torch.Tensor
                  ) -> torch.Tensor:
        """Match score [N] (logit of match minus logit of no match) of N (caption, image) pairs."""
        logits = self.match_logits(text_tokens, ids, image_tokens).float()
        return logits[:, 1] - logits[:, 0]
