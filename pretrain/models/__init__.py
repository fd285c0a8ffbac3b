"""Model code: towers, decoder, heads and the joint pretraining model. Single-device code throughout;
tensor parallelism is applied to the built model by `pretrain/parallelize.py`, data parallelism enters
only through the losses."""

from pretrain.models.decoder import MAEDecoder
from pretrain.models.heads import MLMHead
from pretrain.models.pretrain_model import PretrainModel, padded_vocab_size
from pretrain.models.text import TextTower
from pretrain.models.transformer import Attention, Block, Transformer
from pretrain.models.vision import VisionTower, random_masking

__all__ = ["Attention", "Block", "MAEDecoder", "MLMHead", "PretrainModel", "TextTower", "Transformer",
           "VisionTower", "padded_vocab_size", "random_masking"]
