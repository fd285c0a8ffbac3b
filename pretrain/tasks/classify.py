"""`train.task=classify`: the fine-tuning classifier's start (FLYP / WiSE-FT).

The head starts as the zero-shot classifier of `finetune.classnames`: the init's full model is built once on
this rank, the class-name prompts are encoded by its text tower, and only the image tower and the head are
kept; the text tower, MAE decoder and MLM head are dropped before DeepSpeed sees the model (fine-tuning never
runs them, and keeping them, even frozen, would cost their weights in memory and in every checkpoint). Every
rank computes the same weights (same source, same fp32 forwards), as for a seeded pretraining init. Rank 0
writes them to `RUN_DIR/zeroshot.safetensors`: the alpha=0 end of `--wise-ft`.

Shards are checked before anything is built: a class index (`.cls`) per sample, in range.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines.shardstream import shard_samples
from data_pipelines.stats import SkipCounter
from data_pipelines.urls import expand_sources
from parallel import groups
from pretrain.config import Config, ConfigError
from pretrain.evaluation.wise_ft import ZEROSHOT_FILE  # the zero-shot classifier, in the run directory

log = logging.getLogger("mmpt.train")

LABEL_SCAN = 64
"""Samples of the first shard read to check that shards carry `.cls` labels in range."""


def classnames_of(cfg: Config) -> list[str]:
    """`finetune.classnames` read (FileNotFoundError / ValueError naming the file)."""
    from pretrain.evaluation.evaluate import read_classnames

    return read_classnames(cfg.finetune.classnames)


def templates_of(cfg: Config) -> list[str] | None:
    """`finetune.templates`, else zeroshot_classification_templates.txt beside the class names, else None
    (the built-in prompts)."""
    from data_pipelines.clip_benchmark import TEMPLATES_FILE
    from pretrain.evaluation.layout import read_templates

    path = Path(cfg.finetune.templates) if cfg.finetune.templates else None
    if path is None and (Path(cfg.finetune.classnames).parent / TEMPLATES_FILE).is_file():
        path = Path(cfg.finetune.classnames).parent / TEMPLATES_FILE
    return read_templates(path) if path is not None else None


def check_labels(urls: str, num_classes: int, what: str, max_bytes: int = 0) -> None:
    """ValueError naming `what` (the flag or key) unless the first shard's first `LABEL_SCAN` samples hold
    `.cls` labels, all in [0, num_classes): a fine-tuning run on caption-only shards would otherwise train
    on nothing, and an out-of-range label fail in the middle of a step."""
    shards = [u for source in expand_sources(urls) for u in source]
    if not shards:
        raise ValueError(f"{what}: no shards in {urls!r}")
    skips = SkipCounter(where=f"label check of {shards[0]}")
    labels, seen = [], 0
    for sample in shard_samples(shards[:1], skips, max_bytes=max_bytes):
        seen += 1
        if "cls" in sample:
            raw = bytes(sample["cls"]).decode("ascii", "replace").strip()
            if not raw.lstrip("-").isdigit():
                raise ValueError(f"{what}: sample {sample['__key__']!r} of {shards[0]} has a .cls that is "
                                 f"not an integer: {raw[:20]!r}")
            labels.append(int(raw))
        if seen >= LABEL_SCAN:
            break
    if not seen:
        raise ValueError(f"{what}: no readable sample in {shards[0]} (skips: {skips.as_dict()})")
    if not labels:
        raise ValueError(f"{what}: none of the first {seen} samples of {shards[0]} has a .cls label; "
                         "fine-tuning for classification needs a class index per sample (into "
                         "--classnames / finetune.classnames)")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"{what}: label {bad[0]} in {shards[0]} is outside the {num_classes} classes of "
                         "finetune.classnames; do the .cls labels index that file?")


def _device() -> torch.device:
    from pretrain.evaluation.evaluate import eval_device

    return eval_device()


def _zeroshot_weights(cfg: Config, tokenizer: Any, init: Any,
                      classnames: list[str]) -> dict[str, torch.Tensor]:
    """Image tower of `init` (a `pretrain.checkpoint.sources.Source`, or None: this run's seeded init) and
    the zero-shot head of `classnames`, as full fp32 tensors named like `ClassifierModel`'s."""
    from pretrain.evaluation.features import TEMPLATES, classifier_weights
    from pretrain.models.classifier import zeroshot_head
    from pretrain.models.pretrain_model import PretrainModel

    full = PretrainModel.from_config(cfg, tokenizer)
    if init is not None:
        if init.config.train.task != "pretrain":
            raise ConfigError(f"--init-from {init.path}: a fine-tuned classifier (train.task="
                              f"{init.config.train.task}) has no text tower to build a zero-shot head from; "
                              "start from a pretrained checkpoint, or continue this run with --resume")
        towers = ("visual", "text", "logit_scale")
        wanted = [n for n, _ in full.named_parameters() if n.split(".")[0] in towers]
        missing = [n for n in wanted if n not in init.layout]
        if missing:
            raise ValueError(f"--init-from {init.path}: lacks {len(missing)} parameters of the towers, e.g. "
                             f"{missing[:3]}")
        with torch.no_grad():
            params = dict(full.named_parameters())
            for n in wanted:
                params[n].copy_(init.tensor(n).view_as(params[n]))
    else:
        log.warning("train.task=classify without --init-from: the head is the zero-shot classifier of an "
                    "untrained model (seed %d)", cfg.train.seed)
    full.eval().to(_device())
    embeddings = classifier_weights(full, tokenizer, classnames, cfg.model.text.context_length,
                                    tuple(templates_of(cfg) or TEMPLATES))
    head = zeroshot_head(embeddings.cpu(), full.logit_scale.cpu())
    visual = {f"visual.{k}": v.detach().float().cpu() for k, v in full.visual.named_parameters()}
    return {**visual, **head}


def class_list_difference(names: list[str], saved: list[str], where: str) -> str:
    """How the class list `names` differs from a checkpoint's `saved` one (they differ): its class count, or
    the first class whose name differs, quoted both ways (`where` names the checkpoint's side)."""
    if len(names) != len(saved):
        return f"{len(names)} classes"
    i = next(i for i, (a, b) in enumerate(zip(names, saved, strict=True)) if a != b)
    return f"other names (class {i}: {names[i]!r} here, {saved[i]!r} {where})"


def check_resumed_classnames(cfg: Config, classnames: list[str], client: dict[str, Any], where: str) -> None:
    """ConfigError naming finetune.classnames unless the checkpoint resumed from (`client`: its client state,
    at `where`) records exactly `classnames`: the head's rows are its classes. A file of another length
    would fail deep inside DeepSpeed's load (a size mismatch); one of the same length with other names would
    train the rows on the wrong names and write those names into the run's checkpoints."""
    saved = client.get("classnames")
    saved_cfg = client.get("config") if isinstance(client.get("config"), dict) else {}
    task = (saved_cfg.get("train") or {}).get("task", "pretrain")
    if not saved:
        raise ConfigError(f"--resume {where}: a train.task={task} checkpoint records no class names (no "
                          "classifier head) and cannot be resumed as a fine-tune; start the fine-tune from "
                          "its weights with --init-from (and a new run.dir)")
    saved = [str(n) for n in saved]
    if saved == classnames:
        return
    saved_file = (saved_cfg.get("finetune") or {}).get("classnames") or "(a file its config does not name)"
    diff = class_list_difference(classnames, saved, "there")
    raise ConfigError(f"finetune.classnames: {cfg.finetune.classnames} holds {diff}, but the checkpoint "
                      f"{where} (--resume) was trained on the {len(saved)} classes of {saved_file} (its "
                      f"head's rows); resume with --classnames {saved_file}, or fine-tune for the new "
                      "classes in a new run.dir with --init-from the pretrained weights")


def build_classifier(cfg: Config, tokenizer: Any, start: Any, run_dir: Path) -> nn.Module:
    """The `ClassifierModel` of `cfg`, its head the zero-shot classifier of `start`'s init (consumed here, so
    `start.load` only resumes); rank 0 writes the zero-shot weights next to the run. A resume must name
    the checkpoint's class names (`check_resumed_classnames`)."""
    from pretrain.models.classifier import ClassifierModel

    classnames = classnames_of(cfg)
    if start.resumed:
        check_resumed_classnames(cfg, classnames, start.client, start.describe())
    check_labels(cfg.data.train, len(classnames), "data.train (--train)", cfg.data.max_sample_bytes)
    if cfg.data.val.strip():
        check_labels(cfg.data.val, len(classnames), "data.val (--val)", cfg.data.max_sample_bytes)
    model = ClassifierModel.from_config(cfg, len(classnames))
    if start.resumed:  # the checkpoint holds the weights; the zero-shot file was written at the first start
        return model
    weights = _zeroshot_weights(cfg, tokenizer, start.init, classnames)
    model.load_state_dict(weights)
    log.info("classifier head: zero-shot weights of %d classes%s", len(classnames),
             f" from {start.init.path}" if start.init is not None else "")
    start.init = None  # consumed: the weights are in the model before DeepSpeed partitions it
    if groups.rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(run_dir / ZEROSHOT_FILE),
                  metadata={"classes": str(len(classnames))})
    return model


