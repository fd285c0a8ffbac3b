"""Validation inside the training job (`eval.every`, `eval.at_end`): is the run learning?

At a validation step every rank, at the same step, evaluates the live model (ZeRO-3 partitioned, tensor
parallel, bf16: exactly what trains) on `data.val`'s first `eval.max_samples` samples:

- the loss of each objective, on masks drawn from `eval.seed` (the same masks at every validation and in
  every layout), computed in eval mode over the batches every data-parallel rank holds in full;
- zero-shot top-1/top-5 when there are class names (`eval.classnames`, or a classnames.txt beside the
  shards; prompts from the zeroshot_classification_templates.txt beside the shards, else the built-in ones,
  as `pretrain eval` picks them: `pretrain.evaluation.layout.find_templates`), and i2t/t2i recall@1/5
  over the validation pairs (`pretrain.evaluation.distributed`: each rank encodes its share, features
  gathered once, counts exact). A `.cls` label past the class names stops the run naming the file.

Validation must not change training: it reads its own loader (the training stream's position is
untouched), runs under no_grad in eval mode, and restores every RNG stream it could touch (torch CPU/CUDA,
the tensor-parallel tracker, numpy, random), so a run with and without `eval.every` trains bit-identically
(a test checks it on CPU).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.urls import expand_sources, is_local, local_path
from parallel import groups
from parallel import rng as tp_rng
from pretrain.evaluation.distributed import check_label_range, metrics_from_features
from pretrain.evaluation.features import TEMPLATES, classifier_weights, shard_features

log = logging.getLogger("mmpt.validate")

LOSS_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm", "loss_itm")


def _first_local_val_shard(cfg: Any) -> str | None:
    urls = [u for source in expand_sources(cfg.data.val) for u in source]
    return local_path(urls[0]) if urls and is_local(urls[0]) else None


def find_classnames(cfg: Any) -> Path | None:
    """`eval.classnames`, else a classnames.txt beside the first local `data.val` shard (or one folder up,
    CLIP_benchmark's place: `pretrain.evaluation.layout.look_beside`, as `pretrain eval` looks), else None."""
    from pretrain.evaluation.layout import CLASSNAMES_FILE, look_beside

    if cfg.eval.classnames:
        return Path(cfg.eval.classnames)
    first = _first_local_val_shard(cfg)
    return look_beside(first, CLASSNAMES_FILE) if first is not None else None


def find_val_templates(cfg: Any) -> tuple[str, ...]:
    """The zero-shot prompts of validation: the templates file beside the first local `data.val` shard (or one
    folder up), else the built-in TEMPLATES, by the function `pretrain eval` uses on the same shards
    (`find_templates`), so `val/zeroshot_*` equals `pretrain eval` on the checkpoint of that step. A bad
    templates file is a ValueError naming it, at start-up."""
    from pretrain.evaluation.layout import find_templates

    first = _first_local_val_shard(cfg)
    prompts = find_templates(first)[1] if first is not None else None
    return tuple(prompts) if prompts else TEMPLATES


class _RngSnapshot:
    """Every random stream training reads, saved before validation and put back after it."""

    def __enter__(self) -> _RngSnapshot:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.tp = tp_rng.get_states() if tp_rng.is_seeded() else None
        self.np, self.py = np.random.get_state(), random.getstate()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.tp is not None:
            tp_rng.set_states(self.tp)
        np.random.set_state(self.np)
        random.setstate(self.py)


class Validator:
    """Runs validation at the configured steps; `run(step)` returns the `val/...` metrics (every rank)."""

    def __init__(self, cfg: Any, tokenizer: Any, model: torch.nn.Module,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]], dtype: torch.dtype) -> None:
        self.cfg, self.tokenizer, self.model, self.prepare, self.dtype = cfg, tokenizer, model, prepare, dtype
        e = cfg.eval
        self.enabled = e.every > 0 or e.at_end
        self.batch_size = e.batch_size or cfg.train.micro_batch
        self.seconds = 0.0
        self.classnames_file: Path | None = None
        self.classnames: list[str] | None = self._classnames() if self.enabled else None
        self.templates = find_val_templates(cfg) if self.classnames else TEMPLATES
        if self.enabled:
            self._check_keep_best()
            grid = cfg.model.image_size // cfg.model.vision.patch_size
            self.masking = (e.seed, cfg.objectives.mlm.mask_prob, grid * grid)

    def _classnames(self) -> list[str] | None:
        """The zero-shot class names, or None (no zero-shot metrics)."""
        from pretrain.evaluation.evaluate import read_classnames

        self.classnames_file = path = find_classnames(self.cfg)
        return read_classnames(path) if path is not None else None

    def metric_names(self) -> list[str]:
        """The `val/...` keys a validation writes (what `checkpoint.keep_best` may name)."""
        o = self.cfg.objectives
        names = ["val/loss"] + [f"val/loss_{k}" for k in ("contrastive", "mim", "mlm", "itm")
                                if getattr(o, k).weight > 0]
        names += [f"val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5)]
        if self.classnames:
            names += ["val/zeroshot_top1", "val/zeroshot_top5"]
        return names

    def _check_keep_best(self) -> None:
        from pretrain.config import ConfigError

        metric = self.cfg.checkpoint.keep_best
        if metric and metric not in self.metric_names():
            why = (" (zero-shot needs eval.classnames or a classnames.txt beside data.val)"
                   if "zeroshot" in metric else "")
            raise ConfigError(f"checkpoint.keep_best: this run's validation has no {metric!r}{why}; "
                              f"it writes {', '.join(self.metric_names())}")

    def due(self, step: int) -> bool:
        e = self.cfg.eval
        return self.enabled and ((e.every > 0 and step % e.every == 0) or (e.at_end and
                                                                           step == self.cfg.train.steps))

    def run(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        model, was_training = self.model, self.model.training
        sums: dict[str, torch.Tensor] = {}
        batches = [0]
        skipped: dict[str, int] = {}

        def losses(batch: dict[str, Any], uniform: bool) -> None:
            if not uniform:  # a collective loss needs the same batch size on every rank
                return
            out = model(self.prepare(batch))
            for k in LOSS_KEYS:
                if k in out:  # summed on the device: one read-back at the end
                    sums[k] = sums.get(k, 0) + out[k].detach().float()
            batches[0] += 1

        with _RngSnapshot(), torch.no_grad():
            model.eval()
            try:
                weights = None
                if self.classnames:
                    weights = classifier_weights(model, self.tokenizer, self.classnames,
                                                 self.cfg.model.text.context_length, self.templates)
                feats = shard_features(model, self.tokenizer, self.cfg, self.cfg.data.val, self.batch_size,
                                       self.cfg.eval.max_samples, dtype=self.dtype, masking=self.masking,
                                       on_batch=losses, skipped=skipped)
                if self.classnames:  # the same rows on every rank: every rank raises
                    check_label_range(feats["cls"], feats["_order"], len(self.classnames),
                                      str(self.classnames_file), self.cfg.data.val)
                metrics = metrics_from_features(feats, weights)
            finally:
                model.train(was_training)
        row: dict[str, Any] = {}
        if batches[0]:
            keys = sorted(sums)
            t = torch.stack([sums[k] for k in keys]) / batches[0]
            if groups.is_distributed() and groups.world_size() > 1:
                dist.all_reduce(t)
                t /= groups.world_size()
            row.update({f"val/{k}": round(float(v), 6) for k, v in zip(keys, t.tolist())})
        if self.classnames and metrics.get("zeroshot_top1") is None:
            log.warning("validation: no sample of data.val has a .cls label; no zero-shot metrics")
        for k in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "samples"):
            if metrics.get(k) is not None:
                row[f"val/{k}"] = metrics[k]
        row["val/skipped"] = skipped  # {reason: count} left out of val/samples; TensorBoard ignores it
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        row["val/seconds"] = round(seconds, 3)
        shown = ", ".join(f"{k[4:]} {v}" for k, v in row.items()
                          if k in ("val/zeroshot_top1", "val/i2t_r1", "val/t2i_r1", "val/loss"))
        log.info("step %d validation on %d samples: %s (%.1f s)", step, metrics["samples"], shown, seconds)
        return row
