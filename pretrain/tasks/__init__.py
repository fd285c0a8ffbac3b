"""What `train.task` changes in the training loop, and nothing else: the model it builds, the validation it
runs and what its checkpoints record. `pretrain.train.train` asks this module for those three and is
otherwise the same loop (engine, launchers, data stream, checkpoints, metrics) for every task.

- `pretrain`: `PretrainModel` (CLIP + MAE + MLM), the zero-shot/retrieval `Validator`, no extra state.
- `classify`: `ClassifierModel` (image tower + linear head, `pretrain.models.classifier`), its head the
  zero-shot classifier of `finetune.classnames` (`pretrain.tasks.classify`), `ClassifyValidator`
  (`val/top1`), and the class names in every checkpoint (the head's rows).

`pretrain finetune` (`pretrain.tasks.command`) runs that loop and then the WiSE-FT sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import Config


def build_model(cfg: Config, tokenizer: Any, start: Any, run_dir: Path) -> nn.Module:
    """The single-device model of `cfg.train.task`, initialised (the caller has seeded torch). For
    `classify` the init weights of `start` are consumed here (so `start.load` only resumes), and rank 0
    writes the zero-shot weights next to the run."""
    if cfg.train.task == "classify":
        from pretrain.tasks.classify import build_classifier

        return build_classifier(cfg, tokenizer, start, run_dir)
    from pretrain.models.pretrain_model import PretrainModel

    return PretrainModel.from_config(cfg, tokenizer)


def client_state(cfg: Config) -> dict[str, Any]:
    """Extra checkpoint client state of the task: `classify` records its class names (the head's rows),
    which the checkpoint readers need for the head's shape."""
    if cfg.train.task != "classify":
        return {}
    from pretrain.tasks.classify import classnames_of

    return {"classnames": classnames_of(cfg)}


def make_validator(cfg: Config, tokenizer: Any, model: nn.Module, prepare: Any, dtype: torch.dtype) -> Any:
    """The task's validation (`eval.every`, `eval.at_end`) over `model`, the live engine module."""
    if cfg.train.task == "classify":
        from pretrain.evaluation.classify import ClassifyValidator

        return ClassifyValidator(cfg, tokenizer, model, prepare, dtype)
    from pretrain.evaluation.validate import Validator

    return Validator(cfg, tokenizer, model, prepare, dtype)
