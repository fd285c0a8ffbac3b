"""`pretrain eval --suite suite.yaml`: several datasets and tasks per call, several checkpoints side by side,
and a metric against training step as a PNG.

    pretrain eval --suite suite.yaml --checkpoint runs/a --checkpoint runs/b --out ev/ [--plot zeroshot_top1]

suite.yaml (paths relative to the current directory, as on the command line)::

    checkpoints: [runs/a]            # optional; every --checkpoint is added
    plot: [zeroshot_top1]            # optional; as --plot METRIC
    batch_size: 128                  # optional
    datasets:
      - name: shapes
        data: shards/val             # shard URLs, our shard folder or a CLIP_benchmark dataset folder
        classnames: shards/val/classnames.txt     # optional when classnames.txt is found (layout.py)
        templates: prompts.txt       # optional: zeroshot_classification_templates.txt, else built-in
        split: test                  # optional: split folder of a CLIP_benchmark folder
        tasks: [zeroshot, retrieval, linear_probe, few_shot]   # default: [zeroshot, retrieval]
        train: 'shards/train/shard-{000000..000003}.tar'       # labelled shards for the two probes
        few_shot: 4                  # K per class, with the few_shot task
        max_samples: 0               # optional cap on evaluated samples

The whole file is checked before any model is loaded, and every problem is reported at once, naming the
dataset and key. Outputs in `--out`: `<checkpoint>.json` (every number `evaluate` gives, per dataset)
and `<checkpoint>.md` per checkpoint, `comparison.md` (datasets x metrics by checkpoint), and with a plot
`<metric>.png` + `<metric>.json` (the points): every complete checkpoint of each run evaluated, one line
per run and dataset. Files are written only after every evaluation succeeded, with `suite-index.json`:
a rerun into the same `--out` removes what the earlier suite wrote and this one does not (a dropped
checkpoint's `.json/.md`, a metric no longer plotted), never a file it did not write (`INDEX_FILE`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipelines.urls import expand_urls
from pretrain.evaluation.layout import EvalData, resolve_eval_data
from pretrain.evaluation.suite_output import checkpoint_markdown, comparison_markdown, plot_curves

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "zeroshot": ("zeroshot_top1", "zeroshot_top5"),
    "retrieval": ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"),
    "linear_probe": ("linear_probe_top1",),
    "few_shot": ("few_shot_top1",),
}
"""Metrics each task adds to the tables (the JSON keeps everything `evaluate` returns)."""
DATASET_KEYS = ("name", "data", "classnames", "templates", "split", "tasks", "train", "few_shot",
                "max_samples")
TOP_KEYS = ("datasets", "checkpoints", "plot", "batch_size")
INDEX_FILE = "suite-index.json"
"""In `--out`: {"files": {name: sha256}} of what the last suite wrote there. A rerun deletes only those of
them it does not write again and that are unchanged since; the user's files, outputs edited by hand and
files of a suite run before the index existed stay (named in a note on the log)."""


@dataclass
class SuiteDataset:
    name: str
    data: EvalData
    tasks: tuple[str, ...]
    train: str | None = None
    few_shot: int = 0
    max_samples: int = 0

    @property
    def metrics(self) -> list[str]:
        return [m for t in self.tasks for m in TASK_METRICS[t]]


@dataclass
class Suite:
    datasets: list[SuiteDataset]
    checkpoints: list[str]
    plot: list[str] = field(default_factory=list)
    batch_size: int = 128


def _int(value: Any, where: str, errors: list[str], least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        errors.append(f"{where}: must be an integer >= {least}, got {value!r}")
        return least
    return value


def _dataset(i: int, entry: Any, seen: set[str], errors: list[str]) -> SuiteDataset | None:
    if not isinstance(entry, dict):
        errors.append(f"datasets[{i}]: must be a mapping with name, data, tasks, ..., got {entry!r}")
        return None
    name = entry.get("name")
    where = f"dataset {name!r}" if isinstance(name, str) and name else f"datasets[{i}]"
    n_before = len(errors)
    if not isinstance(name, str) or not name:
        errors.append(f"{where}: 'name' is required (a non-empty string)")
    elif name in seen:
        errors.append(f"{where}: the name is used twice")
    seen.add(str(name))
    errors += [f"{where}: unknown key {k!r} (known: {', '.join(DATASET_KEYS)})" for k in entry
               if k not in DATASET_KEYS]
    tasks = entry.get("tasks", ["zeroshot", "retrieval"])
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not tasks or any(t not in TASK_METRICS for t in tasks):
        errors.append(f"{where}: tasks: a non-empty list of {', '.join(TASK_METRICS)}, got {tasks!r}")
        tasks = []
    train = entry.get("train")
    if ("linear_probe" in tasks or "few_shot" in tasks) and not train:
        errors.append(f"{where}: tasks linear_probe/few_shot need 'train' (labelled train shard URLs)")
    elif train is not None:
        try:
            expand_urls(str(train))
        except ValueError as e:
            errors.append(f"{where}: train: {e}")
    k = entry.get("few_shot")
    if "few_shot" in tasks:
        k = _int(k, f"{where}: few_shot (K per class, required by the few_shot task)", errors, 1)
    elif k is not None:
        errors.append(f"{where}: few_shot: {k!r} given but 'few_shot' is not in tasks")
    max_samples = _int(entry.get("max_samples", 0), f"{where}: max_samples", errors, 0)
    data = entry.get("data")
    resolved = None
    if not isinstance(data, str) or not data:
        errors.append(f"{where}: 'data' is required (shard URLs or a dataset folder)")
    else:
        try:
            resolved = resolve_eval_data(data, entry.get("classnames"), entry.get("templates"),
                                         split=str(entry.get("split", "test")))
        except (OSError, ValueError) as e:
            errors.append(f"{where}: {e}")
    if len(errors) > n_before or resolved is None:
        return None
    return SuiteDataset(str(name), resolved, tuple(tasks), str(train) if train else None,
                        int(k or 0) if "few_shot" in tasks else 0, max_samples)


def _declared_tasks(entry: dict[str, Any]) -> list[str]:
    """The known task names an entry asks for (default: zeroshot and retrieval)."""
    tasks = entry.get("tasks", ["zeroshot", "retrieval"])
    tasks = [tasks] if isinstance(tasks, str) else tasks
    return [t for t in tasks if t in TASK_METRICS] if isinstance(tasks, list) else []


def check_suite(spec: Any, checkpoints: list[str] | None = None, plot: list[str] | None = None) -> Suite:
    """A validated Suite from a parsed suite mapping plus command-line checkpoints and plot metrics; one
    ValueError listing every problem (dataset and key named), before any model is loaded."""
    errors: list[str] = []
    if not isinstance(spec, dict):
        raise ValueError(f"suite: must be a mapping with 'datasets', got {type(spec).__name__}")
    errors += [f"suite: unknown key {k!r} (known: {', '.join(TOP_KEYS)})" for k in spec if k not in TOP_KEYS]
    entries = spec.get("datasets")
    if not isinstance(entries, list) or not entries:
        errors.append("suite: 'datasets' must be a non-empty list")
        entries = []
    seen: set[str] = set()
    datasets = [d for i, e in enumerate(entries) if (d := _dataset(i, e, seen, errors)) is not None]
    listed = spec.get("checkpoints", [])
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
        errors.append(f"suite: checkpoints: a list of paths, got {listed!r}")
        listed = []
    ckpts = [*listed, *(checkpoints or [])]
    if not ckpts:
        errors.append("suite: no checkpoint: list 'checkpoints' in the suite or pass --checkpoint")
    errors += [f"checkpoint {c}: not found" for c in ckpts if not Path(c).exists()]
    metrics = spec.get("plot", [])
    metrics = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metrics, list):
        errors.append(f"suite: plot: a metric name or a list of them, got {metrics!r}")
        metrics = []
    metrics = [*metrics, *(plot or [])]
    declared = {m for e in entries if isinstance(e, dict) for t in _declared_tasks(e)
                for m in TASK_METRICS[t]}
    for m in metrics:
        if m not in declared:
            errors.append(f"plot: {m!r} is not a metric of any dataset's tasks (they give: "
                          f"{', '.join(sorted(declared)) or 'nothing'})")
    if metrics:
        errors += [f"checkpoint {c}: --plot needs a run directory or checkpoint folder with complete "
                   "checkpoints" for c in ckpts if Path(c).exists() and not run_tags(c)]
    batch = _int(spec.get("batch_size", 128), "suite: batch_size", errors, 1)
    if errors:
        raise ValueError("bad suite:\n  " + "\n  ".join(errors))
    return Suite(datasets, ckpts, metrics, batch)


def load_suite(path: str | Path, checkpoints: list[str] | None = None, plot: list[str] | None = None
               ) -> Suite:
    """Read and check a suite YAML (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: suite file not found")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    try:
        return check_suite(spec, checkpoints, plot)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def run_tags(checkpoint: str | Path) -> tuple[Path, list[str]] | None:
    """(checkpoint root, complete tags oldest first) of a run directory or checkpoint root, else None."""
    from pretrain.checkpoint.atomic import complete_tags

    for root in (Path(checkpoint) / "checkpoints", Path(checkpoint)):
        tags = complete_tags(root)
        if tags:
            return root, tags
    return None


def evaluate_dataset(bundle: tuple[Any, Any, Any], d: SuiteDataset, batch_size: int) -> dict[str, Any]:
    """Everything `evaluate` gives for one dataset of the suite with an already loaded model."""
    from pretrain.evaluation.evaluate import evaluate

    probe = d.train if ("linear_probe" in d.tasks or "few_shot" in d.tasks) else None
    out = evaluate(None, d.data.urls, d.data.classnames, batch_size=batch_size, max_samples=d.max_samples,
                   linear_probe=probe, model_bundle=bundle, templates=d.data.templates, few_shot=d.few_shot,
                   require_labels="zeroshot" in d.tasks)
    if "zeroshot" in d.tasks and out.get("zeroshot_top1") is None:
        raise ValueError(f"dataset {d.name!r}: {d.data.urls} has no .cls labels, which zeroshot needs")
    return out


def _labels(checkpoints: list[str]) -> list[str]:
    """File-name-safe, distinct labels for the checkpoints (their last path parts)."""
    out: list[str] = []
    for c in checkpoints:
        parts = [p for p in Path(c).resolve().parts if p not in ("/", "checkpoints")]
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", parts[-1] if parts else "checkpoint") or "checkpoint"
        label, n = base, 2
        while label in out or label in ("comparison", Path(INDEX_FILE).stem):
            label, n = f"{base}-{n}", n + 1
        out.append(label)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # tables, JSON and PNGs: small


def _remove_stale(dest: Path, kept: set[str], log: Any) -> list[str]:
    """Delete the files the earlier suite's index lists and this suite does not write: plain files directly
    in `dest` whose bytes are still those it wrote, nothing else. Without a readable index nothing goes."""
    try:
        earlier = json.loads((dest / INDEX_FILE).read_text(encoding="utf-8"))["files"] \
            if (dest / INDEX_FILE).exists() else {}
        earlier = {str(k): str(v) for k, v in earlier.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log(f"note: {dest / INDEX_FILE} is not a suite index (unreadable or edited): nothing removed")
        return []
    removed = []
    for name, digest in sorted(earlier.items()):
        path = dest / name
        if name in kept or Path(name).name != name or name in ("", ".", "..", INDEX_FILE) \
                or path.is_symlink() or not path.is_file():
            continue
        if _sha256(path) != digest:
            log(f"note: {path} was written by an earlier suite but has changed since: left as it is")
            continue
        path.unlink()
        removed.append(str(path))
    return removed


def run_suite(suite: Suite, out: str | Path, log: Any = print) -> dict[str, Any]:
    """Evaluate every dataset for every checkpoint (and, for plots, every complete checkpoint of each run),
    then write the outputs (module docstring) into `out` and replace the earlier suite's there (`INDEX_FILE`).
    Returns {label: {dataset: metrics}}, the written paths, the removed ones and the index's path."""
    from pretrain.checkpoint.atomic import latest_tag, step_of
    from pretrain.evaluation.evaluate import load_model

    cache: dict[tuple[str, str | None], dict[str, dict[str, Any]]] = {}

    def results_of(ckpt: str, tag: str | None) -> dict[str, dict[str, Any]]:
        if (ckpt, tag) not in cache:
            log(f"evaluating {ckpt}" + (f" [{tag}]" if tag else ""))
            bundle = load_model(ckpt, tag)
            cache[(ckpt, tag)] = {d.name: evaluate_dataset(bundle, d, suite.batch_size)
                                  for d in suite.datasets}
        return cache[(ckpt, tag)]

    labels = _labels(suite.checkpoints)
    found = {c: run_tags(c) for c in suite.checkpoints}
    table = {lab: results_of(c, latest_tag(found[c][0]) if found[c] else None)
             for lab, c in zip(labels, suite.checkpoints)}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric in suite.plot:
        lines: dict[str, list[tuple[int, float]]] = {}
        for lab, c in zip(labels, suite.checkpoints):
            root, tags = found[c]  # type: ignore[misc]  # check_suite made sure
            for tag in tags:
                for d in suite.datasets:
                    value = results_of(c, tag)[d.name].get(metric) if metric in d.metrics else None
                    if value is not None:
                        lines.setdefault(f"{lab} / {d.name}", []).append((step_of(tag), float(value)))
        curves[metric] = lines
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".suite.", dir=dest))
    try:
        for lab, c in zip(labels, suite.checkpoints):
            (staging / f"{lab}.json").write_text(json.dumps({"checkpoint": c, "datasets": table[lab]},
                                                            indent=1) + "\n")
            (staging / f"{lab}.md").write_text(checkpoint_markdown(lab, c, suite, table[lab]))
        (staging / "comparison.md").write_text(comparison_markdown(labels, suite, table))
        for metric, lines in curves.items():
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", metric)
            (staging / f"{safe}.json").write_text(json.dumps(lines, indent=1) + "\n")
            plot_curves(metric, lines, staging / f"{safe}.png")
        digests = {f.name: _sha256(f) for f in sorted(staging.iterdir())}
        written = []
        for name in digests:
            os.replace(staging / name, dest / name)
            written.append(str(dest / name))
        removed = _remove_stale(dest, set(digests), log)
        (staging / INDEX_FILE).write_text(json.dumps({"written_by": "pretrain eval --suite",
                                                      "files": digests}, indent=1) + "\n")
        os.replace(staging / INDEX_FILE, dest / INDEX_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    others = sorted(p.name for p in dest.iterdir()
                    if p.name not in digests and p.name != INDEX_FILE and not p.name.startswith(".suite."))
    if others:
        log(f"note: {dest} also holds {', '.join(others[:8])}{' ...' if len(others) > 8 else ''}: not "
            f"written by this suite, left as they are")
    return {"results": table, "files": written, "removed": removed, "index": str(dest / INDEX_FILE)}


def run_suite_cli(args: Any) -> int:
    """`pretrain eval --suite FILE` / `--plot METRIC` (argparse namespace of `pretrain eval`): with --plot and
    no --suite, the one dataset of --data (and its --linear-probe/--few-shot) is the suite."""
    import sys

    if not args.out:
        raise ValueError("--suite and --plot write files: pass --out DIR")
    plot = [args.plot] if args.plot else []
    if args.suite:
        if args.data or args.linear_probe or args.few_shot:
            raise ValueError("--suite lists its own datasets and tasks: drop --data, --linear-probe and "
                             "--few-shot")
        suite = load_suite(args.suite, args.checkpoint, plot)
    else:
        if not args.data:
            raise ValueError("--plot needs --data (or a --suite file)")
        tasks = ["zeroshot", "retrieval"] + (["linear_probe"] if args.linear_probe else []) + (
            ["few_shot"] if args.few_shot else [])
        entry = {"name": "data", "data": args.data, "classnames": args.classnames,
                 "templates": args.templates, "split": args.split, "tasks": tasks, "train": args.linear_probe,
                 "few_shot": args.few_shot or None, "max_samples": args.max_samples}
        suite = check_suite({"datasets": [{k: v for k, v in entry.items() if v is not None}],
                             "batch_size": args.batch_size}, args.checkpoint, plot)
    result = run_suite(suite, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"out": str(args.out), **result}), flush=True)
    else:
        print((Path(args.out) / "comparison.md").read_text(), end="", flush=True)
    return 0
