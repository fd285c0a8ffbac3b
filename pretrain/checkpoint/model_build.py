"""The single-device model a checkpoint's config describes, and its tokenizer: what every checkpoint reader
needs, kept apart from `sources` so that `atomic` (through `zero0_masters`) can build it without an import
cycle."""

from __future__ import annotations

import torch

from pretrain.config import Config


def build_model(cfg: Config, tokenizer_json: str, device: str | torch.device = "cpu",
                classnames: list[str] | None = None) -> torch.nn.Module:
    """The single-device PretrainModel of `cfg` with the tokenizer's vocabulary (meta device: no memory);
    for a fine-tuned classifier (`train.task=classify`) its `ClassifierModel`, with one head row per class
    of `classnames` (what its checkpoints record)."""
    from pretrain.models.pretrain_model import PretrainModel

    if cfg.train.task == "classify":
        from pretrain.models.classifier import ClassifierModel

        if not classnames:
            raise ValueError("a train.task=classify checkpoint without its class names (client state "
                             "`classnames`): cannot tell the classifier head's shape")
        with torch.device(device):
            return ClassifierModel.from_config(cfg, len(classnames))
    tok = load_tokenizer(tokenizer_json)
    with torch.device(device):
        return PretrainModel.from_config(cfg, tok)


def load_tokenizer(tokenizer_json: str):
    from data_pipelines.tokenizer import tokenizer_from_json

    return tokenizer_from_json(tokenizer_json, source="the checkpoint's tokenizer")
