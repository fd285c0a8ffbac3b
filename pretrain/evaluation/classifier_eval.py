"""`pretrain eval` of a fine-tuned classifier (`train.task=classify`: the image tower + linear class head that
`pretrain finetune --task classify` trains) on labelled held-out shards: top-1 / top-5 accuracy and mean
cross-entropy, from any checkpoint kind eval reads (DeepSpeed tag or run directory of any (dp, tp),
universal checkpoint, safetensors export).

    pretrain eval --checkpoint runs/ft --data 'val/shard-{000000..000001}.tar' [--classnames F] [--json]

Why these numbers compare: they are `pretrain.evaluation.classify.classify_metrics`', the function that
validation during the fine-tune and the WiSE-FT sweep call, run on the model the fine-tune builds
(`ClassifierModel.from_config(cfg, classes)`, loaded as plain fp32 weights the way `wise_ft` loads them),
so `classify_top1` is the run's `val/top1` on the same shards. Runs as one process or on every rank of a
launcher (each rank scores its share; the counts are gathered, so every rank gets the same result).

The class names are the checkpoint's (its head's rows, recorded in its client state). A class-names file
given with --classnames, or found where `resolve_eval_data` looks (beside the shards, one folder up, in a
CLIP_benchmark folder), that differs is refused naming both: the `.cls` labels of those shards index
another list than the head's. Flags that need a text tower, or compare CLIP checkpoints, are refused by
name (`REFUSED`) instead of failing somewhere inside.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data_pipelines.clip_benchmark import CLASSNAMES_FILE
from pretrain.checkpoint.sources import Source, load_tokenizer
from pretrain.config import Config

CLASSIFY_TASK = "classify"

REFUSED: dict[str, str] = {
    "--linear-probe": "fits a logistic regression on frozen CLIP image features (the classifier's head is "
                      "already trained on labels)",
    "--few-shot": "fits a few-shot probe on frozen CLIP image features (the classifier's head is already "
                  "trained on labels)",
    "--rerank": "re-ranks retrieval candidates with a fusion encoder and text tower, which a classifier has "
                "not",
    "--binding": "scores captions with a text tower, which a classifier has not",
    "--templates": "are prompts for a zero-shot head built by a text tower; a classifier's head is trained",
    "--suite": "compares CLIP checkpoints on zero-shot and retrieval datasets",
    "--plot": "draws CLIP checkpoints' zero-shot and retrieval metrics against the training step",
}
"""`pretrain eval` flags that make no sense for a classifier, and why (said in the refusal)."""


def is_classifier(cfg: Config) -> bool:
    """Whether `cfg` is a fine-tuned classifier's (`train.task=classify`)."""
    return cfg.train.task == CLASSIFY_TASK


def checkpoint_task(path: str | Path) -> str | None:
    """`train.task` the checkpoint at `path` records, read from its config alone (no weights loaded, no
    files hashed), for refusing --suite / --plot before they start; None when it cannot be read, so that the
    command's own reader names that problem (a missing path, a damaged file) as it always has."""
    from pretrain.checkpoint import atomic as ckpt
    from pretrain.checkpoint.sources import UNIVERSAL_META, WEIGHTS_CONFIG, is_universal, is_weights

    p = Path(path)
    try:
        if is_universal(p):
            meta = json.loads((p / UNIVERSAL_META).read_text())
        elif is_weights(p):
            meta = json.loads((p / WEIGHTS_CONFIG).read_text())
        else:
            found = ckpt.resolve(str(p), p / "checkpoints")
            meta = ckpt.read_client_state(*found) if found else {}
        train = (meta.get("config") or {}).get("train") or {}
    except Exception:  # a probe: an unreadable checkpoint is named later by the command's own reader
        return None
    return str(train.get("task", "pretrain"))


def _refusal(flag: str, path: str | Path) -> ValueError:
    return ValueError(f"{flag} does not apply to {path}: a fine-tuned classifier (train.task=classify: image "
                      f"tower + class head, no text tower); {flag} {REFUSED[flag]}. Drop it: `pretrain eval "
                      f"--checkpoint {path} --data SHARDS` reports the classifier's classify_top1, "
                      "classify_top5 and classify_loss")


def refuse_flags(path: str | Path, args: Any) -> None:
    """ValueError naming the first `REFUSED` flag set on `args` (the parsed `pretrain eval` options, read by
    attribute: `--linear-probe` -> `linear_probe`) for the classifier at `path`."""
    for flag in REFUSED:
        if getattr(args, flag[2:].replace("-", "_"), None):
            raise _refusal(flag, path)


def refuse_suite(checkpoints: list[str], flag: str) -> None:
    """ValueError naming `flag` (--suite or --plot) when one of the `--checkpoint`s is a classifier; the
    suite's own YAML checkpoints are refused by its model loader (`refuse_classifier`)."""
    for c in checkpoints:
        if checkpoint_task(c) == CLASSIFY_TASK:
            raise _refusal(flag, c)


def classifier_data(data: str, classnames: str | Path | None = None,
                    split: str = "test") -> tuple[str, Path | None]:
    """(shard URLs, class-names file or None) of `data`: shard URLs or a dataset folder, found and checked
    by `resolve_eval_data` as for CLIP eval, except that no class-names file is no error (the classifier's
    class names are in its checkpoint) and shards without `.txt` captions are read (a classifier needs the
    image and its `.cls` label: image + `.cls` sets such as clip_benchmark_export_wds writes)."""
    from pretrain.evaluation.layout import resolve_eval_data

    ds = resolve_eval_data(data, classnames or None, None, split=split, need_classnames=False, captions=False)
    return ds.urls, ds.classnames


def check_classnames(saved: list[str], names_file: Path | None, src: Source, given: bool) -> None:
    """ValueError naming both lists unless `names_file` (None: nothing to compare) holds exactly the class
    names the checkpoint records (`saved`): the shards' `.cls` labels index that file, the head's rows
    `saved`, so any difference would score labels against the wrong classes."""
    if names_file is None:
        return
    from pretrain.evaluation.evaluate import read_classnames

    names = read_classnames(names_file)
    if names == saved:
        return
    how = "--classnames" if given else f"{CLASSNAMES_FILE} found beside the shards"
    theirs = src.config.finetune.classnames or "(a file its config does not name)"
    from pretrain.tasks.classify import class_list_difference

    diff = class_list_difference(names, saved, "in the checkpoint")
    raise ValueError(f"{names_file} ({how}) holds {diff}, but the classifier {src.path} was fine-tuned on "
                     f"the {len(saved)} classes of {theirs} (its head's rows, recorded in the checkpoint): "
                     "the .cls labels of these shards index another class list; evaluate on shards labelled "
                     f"with the checkpoint's classes (--classnames {theirs})")


def saved_classnames(src: Source) -> list[str]:
    """The class names a classifier checkpoint records (its head's rows, client state `classnames`);
    ValueError naming the checkpoint when it records none (the head's classes are then unknown)."""
    saved = [str(n) for n in src.meta.get("classnames") or []]
    if not saved:
        raise ValueError(f"{src.path}: a train.task=classify checkpoint that records no class names (client "
                         "state `classnames`): the classifier head's classes are unknown")
    return saved


def load_classifier(src: Source) -> tuple[Any, Any, Config]:
    """(model, tokenizer, config) of a classifier checkpoint: the fine-tune's `ClassifierModel` (image tower +
    head, one row per recorded class), its fp32 weights loaded strictly, in eval mode on this rank's device
    (`eval_device`): what the WiSE-FT sweep scores at alpha=1."""
    from pretrain.evaluation.evaluate import eval_device
    from pretrain.models.classifier import ClassifierModel

    cfg = src.config
    model = ClassifierModel.from_config(cfg, len(saved_classnames(src)))
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {src.path} does not match the classifier of its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(eval_device()).eval(), load_tokenizer(src.meta["tokenizer"]), cfg


def evaluate_classifier(src: Source, data: str, classnames: str | Path | None = None, split: str = "test",
                        batch_size: int = 128, max_samples: int = 0, workers: int = 0) -> dict[str, Any]:
    """Accuracy of the classifier `src` on the labelled samples among the first `max_samples` of `data` (0:
    all): `classify_top1`, `classify_top5`, `classify_loss` (`classify_metrics`), `samples` (read),
    `labelled`, `skipped` ({reason: count} summed over the ranks, as `pretrain eval` reports it), `classes`,
    `chance`, `seconds` / `images_per_s` (scoring, not the model load). Every rank of a launcher calls this
    and gets the same result. Data and class names are checked before the weights are read."""
    from pretrain.evaluation.classify import classify_metrics

    if max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: all), got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    saved = saved_classnames(src)
    urls, names_file = classifier_data(data, classnames, split)
    check_classnames(saved, names_file, src, given=bool(classnames))
    model, tokenizer, cfg = load_classifier(src)
    t0 = time.perf_counter()
    m = classify_metrics(model, tokenizer, cfg, urls, batch_size, max_samples, workers=workers)
    seconds = time.perf_counter() - t0
    return {"classes": len(saved), "chance": round(1.0 / len(saved), 6),
            "classify_top1": m["top1"], "classify_top5": m["top5"], "classify_loss": m["loss"],
            "samples": m["samples"], "labelled": m["labelled"], "skipped": m["skipped"],
            "seconds": round(seconds, 3), "images_per_s": round(m["samples"] / max(seconds, 1e-9), 2)}
