"""Pretraining losses: CLIP contrastive, MAE masked-image, BERT masked-language modeling and image-text
matching."""

from pretrain.objectives.contrastive import contrastive_loss
from pretrain.objectives.itm import hard_negatives, itm_loss, swap_words
from pretrain.objectives.mim import feature_mim_loss, mim_loss, patchify, unpatchify
from pretrain.objectives.mlm import mlm_loss

__all__ = ["contrastive_loss", "feature_mim_loss", "hard_negatives", "itm_loss", "mim_loss", "mlm_loss",
           "patchify", "swap_words", "unpatchify"]
