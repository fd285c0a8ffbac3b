"""Zero-shot classification, image<->text retrieval and linear probe on held-out shards, from a checkpoint.

Runs as one process, or under any launcher (deepspeed, torchrun, mpirun, srun): each rank then loads the
consolidated fp32 weights (read parameter by parameter from any checkpoint kind and (dp, tp) layout; for
ZeRO-3 the same tensors DeepSpeed's zero_to_fp32 gives, which a test checks), encodes its share of the
shards, and the metrics are computed from the gathered features exactly as one process would
(`pretrain.evaluation.distributed`). What is evaluated is what a user converting the checkpoint gets.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.clip_benchmark import read_classnames as read_clip_benchmark_classnames
from data_pipelines.tokenizer import TextTokenizer
from parallel import groups
from parallel.consensus import from_rank0
from pretrain.checkpoint.sources import Source, load_tokenizer, open_source, refuse_classifier
from pretrain.config import Config
from pretrain.evaluation.distributed import check_label_range, metrics_from_features
from pretrain.evaluation.features import TEMPLATES, classifier_weights, shard_features
from pretrain.evaluation.rerank import rerank_metrics
from pretrain.models.pretrain_model import PretrainModel

__all__ = ["TEMPLATES", "classifier_weights", "evaluate", "load_model", "model_from_source",
           "read_classnames"]

log = logging.getLogger("mmpt.eval")
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def load_model(checkpoint: str | Path, tag: str | None = None) -> tuple[PretrainModel, TextTokenizer, Config]:
    """Model (eval mode, fp32), tokenizer and config from a run directory, DeepSpeed checkpoint of any
    (dp, tp), universal checkpoint or weights export (`pretrain.checkpoint.sources.open_source`)."""
    return model_from_source(open_source(checkpoint, tag))


def model_from_source(src: Source) -> tuple[PretrainModel, TextTokenizer, Config]:
    """`load_model` of an already opened checkpoint: `pretrain eval` opens it once (opening hashes its files)
    and looks at its task first, since a fine-tuned classifier is scored by `classifier_eval` instead."""
    cfg = src.config
    refuse_classifier(cfg, src.path)  # a fine-tune's image tower + head: named, not "missing logit_scale"
    tokenizer = load_tokenizer(src.meta["tokenizer"])
    model = PretrainModel.from_config(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {src.path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval(), tokenizer, cfg


def read_classnames(path: str | Path) -> list[str]:
    """The lines of a classnames.txt, blank ones included as clip_benchmark reads them; FileNotFoundError /
    ValueError naming the file otherwise.
    Repeated names are warned about (`warn_duplicate_classnames`)."""
    names = read_clip_benchmark_classnames(path)
    warn_duplicate_classnames(path, names)
    return names


def warn_duplicate_classnames(path: str | Path, names: list[str]) -> None:
    """One warning (rank 0, once per file and content in a process) naming the class names that repeat and
    their 0-based class indices: their prompts give the same class embedding, zero-shot top-k then breaks
    the tie for the lower index (as clip_benchmark does), so every sample of the later class scores as a
    miss (real label sets do repeat names, e.g. ImageNet's two "crane"s)."""
    at: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        at.setdefault(name, []).append(i)
    dups = {name: idx for name, idx in at.items() if len(idx) > 1}
    key = (str(path), tuple(names))
    if not dups or groups.rank() != 0 or key in _WARNED:
        return
    _WARNED.add(key)
    shown = "; ".join(f"{name!r} at {', '.join(map(str, idx))}" for name, idx in list(dups.items())[:5])
    more = f"; and {len(dups) - 5} more" if len(dups) > 5 else ""
    log.warning("%s: %d class names repeat (%s%s; 0-based class indices): zero-shot ties go to the lower "
                "index, so the samples of the later ones score as misses", path, len(dups), shown, more)


def eval_device() -> torch.device:
    """This rank's GPU when there is one (LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _probe_on_rank0(model: Any, tokenizer: TextTokenizer, cfg: Config, train_urls: str, batch_size: int,
                    test: dict[str, torch.Tensor], data: str, few_shot: int = 0,
                    classnames: list[str] | None = None) -> dict[str, Any]:
    """Train features encoded by every rank, the logistic regression fitted once on rank 0 and its result
    broadcast (scikit-learn runs on one process; the others would only repeat it)."""
    from pretrain.evaluation.probe import linear_probe as fit_probe

    has = test["cls"] >= 0
    if not bool(has.any()):
        raise ValueError(f"--linear-probe: {data} has no labelled (.cls) samples to score the probe on")
    train_skipped: dict[str, int] = {}
    train = shard_features(model, tokenizer, cfg, train_urls, batch_size, texts=False, skipped=train_skipped)
    keep = train["cls"] >= 0
    if not bool(keep.any()):
        raise ValueError(f"--linear-probe: no labelled (.cls) samples in {train_urls}")
    result: list[Any] = [None]
    if groups.rank() == 0:
        def xy(f: dict[str, torch.Tensor], m: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            return f["image"][m].float().cpu().numpy(), f["cls"][m].cpu().numpy().astype(np.int64)

        result[0] = fit_probe(*xy(train, keep), *xy(test, has))
        if few_shot:
            from pretrain.evaluation.probe import few_shot_probe

            result[0].update(few_shot_probe(*xy(train, keep), *xy(test, has), few_shot, classnames))
    out = from_rank0(result[0])
    out["linear_probe_train_skipped"] = train_skipped  # the same on every rank
    return out


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str, classnames_file: str | Path, batch_size: int = 128,
             max_samples: int = 0, workers: int = 0, linear_probe: str | None = None,
             model_bundle: tuple[Any, TextTokenizer, Config] | None = None,
             templates: list[str] | None = None, few_shot: int = 0,
             require_labels: bool = True, rerank: int = 0) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (prompt ensemble) and i2t/t2i recall@1/5 on `data`'s held-out samples (the
    first `max_samples` in shard order; 0: all); with `linear_probe` (labelled train shard URLs) also
    `linear_probe_top1` (`pretrain.evaluation.probe`), and with `few_shot` K > 0 also `few_shot_top1` (K per
    class of those train features). `model_bundle` (model, tokenizer, config) evaluates an already loaded
    model instead of `checkpoint`. `templates` ("{}" patterns, e.g. a CLIP_benchmark templates file)
    replace the built-in TEMPLATES. Shards without any `.cls` label are an error unless `require_labels`
    is false (retrieval only: zero-shot keys are then None). Under a launcher every rank calls this and
    gets the same metrics. `seconds` / `images_per_s` time the encoding and metrics (not the model load;
    the probe's train features and fit come after). `rerank` K > 0 adds ITM re-ranking of the top-K
    retrieval candidates (`pretrain.evaluation.rerank`, needs a fusion checkpoint; timed with the rest).
    `skipped` ({reason: count}, summed over the ranks) counts the samples of `data` the loader left out of
    `samples` (corrupt image, missing caption, ...), `linear_probe_train_skipped` those of the probe's train
    shards; each non-empty one is also logged as a warning naming the shards. A `.cls` label past the
    class names (another dataset's file) is a ValueError naming both (`check_label_range`)."""
    if max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: all), got {max_samples}")
    classnames = read_classnames(classnames_file)
    model, tokenizer, cfg = model_bundle if model_bundle is not None else load_model(checkpoint)
    if model_bundle is None:
        model.to(eval_device())
    t0 = time.perf_counter()
    prompts = tuple(templates) if templates else TEMPLATES
    weights = classifier_weights(model, tokenizer, classnames, cfg.model.text.context_length, prompts)
    if rerank and getattr(model, "itm_head", None) is None:  # before encoding anything
        rerank_metrics(model, {}, rerank)
    skipped: dict[str, int] = {}
    feats = shard_features(model, tokenizer, cfg, data, batch_size, max_samples, workers=workers,
                           pairs=rerank > 0, skipped=skipped)
    check_label_range(feats["cls"], feats["_order"], len(classnames), str(classnames_file), data)
    out: dict[str, Any] = {"classes": len(classnames), "chance": round(1.0 / len(classnames), 6)}
    out.update(metrics_from_features(feats, weights))
    out["skipped"] = skipped
    if rerank:
        out.update(rerank_metrics(model, feats, rerank))
    if not out.pop("labelled", 0) and require_labels:
        raise ValueError(f"{data}: none of the {out['samples']} samples has a .cls label, so zero-shot "
                         f"classification against {classnames_file} cannot be scored (labels index "
                         "classnames.txt, one integer per sample)")
    seconds = time.perf_counter() - t0  # encoding + metrics, on every rank; not the model load
    out["seconds"] = round(seconds, 3)
    out["images_per_s"] = round(out["samples"] / max(seconds, 1e-9), 2)
    if linear_probe:
        out.update(_probe_on_rank0(model, tokenizer, cfg, linear_probe, batch_size, feats, data, few_shot,
                                   classnames))
    return out
