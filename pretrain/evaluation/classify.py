"""Accuracy of a fine-tuned classifier (`train.task=classify`) on held-out shards, on every rank at once:
validation during fine-tuning (the live engine module: ZeRO-3, TP, bf16) and the WiSE-FT sweep (plain fp32
models) both call `classify_metrics`, so the numbers of the two compare.

Each data-parallel rank runs the classifier over its share (`pretrain.evaluation.distributed`: ranks keep
in step for ZeRO-3, a rank whose share ran out runs a one-sample dummy), keeps only each sample's top-5
class indices and its cross-entropy, and those rows are gathered once into single-process order; the counts
are then the same on every rank and in every layout.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.evaluation.distributed import (
    check_label_range,
    encode_share,
    gather_features,
    sum_skips,
    warn_skips,
)
from pretrain.evaluation.features import _dp, eval_share, model_device
from pretrain.evaluation.validate import Validator, _RngSnapshot

log = logging.getLogger("mmpt.validate")

METRICS = ("loss", "top1", "top5")
"""What a classification validation writes, as `val/<name>`."""


@torch.no_grad()
def classify_metrics(model: Any, tokenizer: Any, cfg: Any, urls: str, batch_size: int, max_samples: int = 0,
                     dtype: torch.dtype | None = None, workers: int = 0) -> dict[str, Any]:
    """top-1 / top-5 accuracy and mean cross-entropy of `model.logits` over the labelled samples among the
    first `max_samples` of `urls` (0: all); keys `top1`, `top5`, `loss`, `samples`, `labelled`, and
    `skipped` ({reason: count} of the samples the loader left out, summed over the ranks; also logged as a
    warning). ValueError (on every rank) when no rank read a labelled sample, or when a `.cls` label is past
    the head's classes (`finetune.classnames` of another dataset: the loss would be clamped to the last
    class and the label scored as a miss). A sample is an image and its `.cls` label; a caption is not
    needed (labelled image sets have none), and a sample without a usable label is skipped (counted), so
    `labelled` equals `samples`."""
    device = model_device(model)
    _, _, dp_group = _dp()
    S = cfg.model.image_size
    # image + `.cls` is a classifier's sample: caption-less labelled sets (clip_benchmark_export_wds, timm)
    # are read, and an unlabelled sample is skipped as `missing_label` / `bad_label`
    loader, skips = eval_share(urls, tokenizer, cfg, batch_size, max_samples, workers, captions=False,
                               labels=True)
    in_dtype = dtype or torch.float32
    classes = [0]  # the head's width, seen on the first forward (a dummy one included)

    def encode(batch: dict[str, Any] | None, uniform: bool) -> dict[str, torch.Tensor]:
        if batch is None:  # this rank's share is done: the same forwards on one blank sample
            images = torch.zeros(1, 3, S, S, dtype=in_dtype, device=device)
            order = torch.zeros(1, 2, dtype=torch.long, device=device)
            labels = torch.full((1,), -1, dtype=torch.long, device=device)
        else:
            images = batch["image"].to(device=device, dtype=in_dtype)
            order, labels = batch["_order"].to(device), batch["cls"].to(device)
        logits = model.logits(images)  # [B, C] fp32
        classes[0] = logits.shape[1]
        has = labels >= 0
        nll = F.cross_entropy(logits, labels.clamp(min=0, max=logits.shape[1] - 1), reduction="none") * has
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        return {"top": top, "nll": nll, "cls": labels, "_order": order}

    local = encode_share(loader, encode, device)  # {} on every rank when no rank read a sample
    feats = gather_features(local, dp_group) if local else {}
    skipped = sum_skips(skips.total(), dp_group)
    labels = feats.get("cls", torch.empty(0, dtype=torch.long))
    has = labels >= 0
    labelled = int(has.sum())
    if not labelled:
        raise ValueError(f"{urls}: no readable sample with a .cls label among the first "
                         f"{max_samples or 'all'} positions; classification accuracy needs labelled shards"
                         + (f" (skipped: {skipped})" if skipped else ""))
    names = f"finetune.classnames ({cfg.finetune.classnames})" if cfg.finetune.classnames else "the head"
    check_label_range(labels, feats["_order"], classes[0], names, urls)
    warn_skips(urls, skipped, len(labels))
    top, y = feats["top"][has], labels[has].unsqueeze(1)
    return {
        "top1": round(int((top[:, :1] == y).any(dim=1).sum()) / labelled, 6),
        "top5": round(int((top == y).any(dim=1).sum()) / labelled, 6),
        "loss": round(float(feats["nll"].sum()) / labelled, 6),
        "samples": int(len(labels)), "labelled": labelled, "skipped": skipped,
    }


class ClassifyValidator(Validator):
    """`eval.every` / `eval.at_end` for `train.task=classify`: top-1/top-5 and cross-entropy of the
    fine-tuned classifier on `data.val` (`val/top1`, `val/top5`, `val/loss`). Same schedule, keep-best check
    and RNG isolation as the pretraining `Validator`; no zero-shot or retrieval (there is no text tower)."""

    def _classnames(self) -> None:
        return None  # the head holds the classes; there is no zero-shot classifier to build

    def metric_names(self) -> list[str]:
        return [f"val/{k}" for k in METRICS]

    def run(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        model, was_training = self.model, self.model.training
        with _RngSnapshot(), torch.no_grad():
            model.eval()
            try:
                m = classify_metrics(model, self.tokenizer, self.cfg, self.cfg.data.val, self.batch_size,
                                     self.cfg.eval.max_samples, dtype=self.dtype)
            finally:
                model.train(was_training)
        row: dict[str, Any] = {f"val/{k}": m[k] for k in METRICS}
        row["val/samples"] = m["samples"]
        row["val/skipped"] = m["skipped"]
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        row["val/seconds"] = round(seconds, 3)
        log.info("step %d validation on %d samples: top1 %s, loss %s (%.1f s)", step, m["samples"],
                 m["top1"], m["loss"], seconds)
        return row
