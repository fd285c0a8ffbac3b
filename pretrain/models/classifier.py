"""The fine-tuning model of `train.task=classify`: the CLIP image tower and a linear head over its
normalised embedding, trained with cross-entropy on the `.cls` labels (FLYP / WiSE-FT practice).

It keeps the forward contract of `PretrainModel` (`batch -> {"loss", ...}`, the loss inside forward so
ZeRO-3 has gathered every parameter it touches) and the two hooks the training loop calls on it, so
`pretrain.train.train` runs it unchanged. Parameter names are the pretraining model's for the tower
(`visual.*`) plus `head.weight` / `head.bias`, so tensor parallelism, `train.freeze` patterns and the
checkpoint readers see the same names as for pretraining.

The text tower is not part of it: fine-tuning never runs it, and keeping it (even frozen) would cost its
weights in memory and in every checkpoint. It is needed once, to build the head: `zeroshot_head` turns
the class-name prompt embeddings into the head's initial weights (see `pretrain.tasks.classify`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config, ModelConfig
from pretrain.models.vision import VisionTower

IGNORE_LABEL = -1
"""The loader's label for a sample without a `.cls` member: ignored by the loss and the accuracy."""


class ClassifierModel(nn.Module):
    """Image tower + linear head. `logits = head(normalize(visual(image)))`: with the head initialised to
    logit_scale x the zero-shot class embeddings (`zeroshot_head`), step 0 is the zero-shot classifier."""

    def __init__(self, model_cfg: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        m, v = model_cfg, model_cfg.vision
        self.model_cfg, self.num_classes = m, num_classes
        self.visual = VisionTower(m.image_size, v.patch_size, v.width, v.layers, v.heads, m.embed_dim,
                                  mlp_ratio=m.mlp_ratio, act=m.activation, dropout=m.dropout,
                                  attn_dropout=m.attention_dropout, block_init=v.block_init)
        self.head = nn.Linear(m.embed_dim, num_classes)
        with torch.no_grad():
            self.head.weight.zero_()  # replaced by `zeroshot_head` or a checkpoint's weights
            self.head.bias.zero_()

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> ClassifierModel:
        return cls(cfg.model, num_classes)

    # ------------------------------------------------------------------ training-loop hooks
    def set_unmasked_tail(self, on: bool) -> None:
        """No masking in fine-tuning: every forward sees every patch (the loop calls this each step)."""

    def set_itm_hardness(self, step: int) -> None:
        """No image-text matching in fine-tuning (the loop calls this each step)."""

    def contrastive_mask_ratio(self) -> float:
        """Fraction of patches hidden from the encoder: always 0 here (logged as in pretraining)."""
        return 0.0

    # ------------------------------------------------------------------------------ forwards
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> class logits [B, C] in fp32 (the head runs in the working precision)."""
        emb = F.normalize(self.visual(images), dim=-1)
        return self.head(emb).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy over the labelled samples of the batch (`cls` >= 0; unlabelled ones are ignored,
        a batch without any gives a zero loss that still reaches every parameter); `top1` is the batch's
        training accuracy, detached."""
        labels = batch["cls"].long()
        logits = self.logits(batch["image"])
        bad = (labels >= self.num_classes) | (labels < IGNORE_LABEL)
        if bool(bad.any()):
            raise ValueError(f"label {int(labels[bad][0])} of this batch is outside the {self.num_classes} "
                             "classes of finetune.classnames; do the .cls labels index that file?")
        has = labels != IGNORE_LABEL
        n = has.sum()
        nll = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        loss = (nll * has).sum() / n.clamp(min=1)
        hits = ((logits.argmax(dim=1) == labels) & has).sum()
        return {"loss": loss, "top1": (hits.float() / n.clamp(min=1)).detach()}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> L2-normalised fp32 embeddings [B, E] (as `PretrainModel.encode_image`)."""
        return F.normalize(self.visual(images).float(), dim=-1)


@torch.no_grad()
def zeroshot_head(class_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Head weights of the zero-shot classifier: `exp(logit_scale) x` the normalised class embeddings [C, E]
    and a zero bias, so `head(normalize(image embedding))` are exactly CLIP's zero-shot logits."""
    scale = logit_scale.detach().float().exp().reshape(())
    weight = class_embeddings.float() * scale
    return {"head.weight": weight, "head.bias": torch.zeros(len(weight))}
