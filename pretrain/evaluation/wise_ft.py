"""WiSE-FT (Wortsman et al., 2022): weight-space interpolation between the zero-shot classifier a fine-tuning
run started from and the fine-tuned one, scored on held-out shards for each mixing coefficient.

    theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned

Interpolated: every parameter of the classifier, i.e. the whole image tower (`visual.*`: patch embedding,
class and positional embeddings, every transformer block, the final norm and the projection) and the
linear head (`head.weight`, `head.bias`). theta_zero_shot is `RUN_DIR/zeroshot.safetensors`, written when
the run started: the init's image tower and the head built from the class-name prompts (weight =
logit_scale x class embeddings, bias 0), so alpha=0 scores exactly as `pretrain eval`'s zero-shot
classifier of the init, and alpha=1 is the fine-tuned checkpoint. The text tower is in neither model.

Runs as one process or on every rank of a launcher (each loads the weights and scores its share of the
shards, `pretrain.evaluation.classify`); rank 0 writes `RUN_DIR/wise_ft.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from parallel import groups
from pretrain.checkpoint.sources import load_tokenizer, open_source
from pretrain.evaluation.classify import classify_metrics
from pretrain.models.classifier import ClassifierModel

ZEROSHOT_FILE = "zeroshot.safetensors"
RESULT_FILE = "wise_ft.json"


def interpolate(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) x zero_shot + alpha x fine_tuned, parameter by parameter (fp32). ValueError when the two
    do not hold the same parameters and shapes (e.g. a zero-shot file of another run)."""
    if set(zero_shot) != set(fine_tuned):
        only = sorted(set(zero_shot) ^ set(fine_tuned))
        raise ValueError(f"WiSE-FT: the zero-shot and fine-tuned weights hold different parameters, e.g. "
                         f"{only[:3]}")
    out = {}
    for name, z in zero_shot.items():
        f = fine_tuned[name]
        if z.shape != f.shape:
            raise ValueError(f"WiSE-FT: {name} has shape {tuple(z.shape)} in the zero-shot weights and "
                             f"{tuple(f.shape)} in the fine-tuned ones")
        out[name] = torch.lerp(z.float(), f.float(), float(alpha))
    return out


def wise_ft_sweep(run_dir: str | Path, alphas: list[float], data: str | None = None,
                  checkpoint: str | Path | None = None, batch_size: int | None = None,
                  max_samples: int | None = None, workers: int = 0) -> dict[str, Any]:
    """Accuracy on `data` (default: the run's `data.val`, first `eval.max_samples` samples, as its
    validation) of the interpolated classifier for each alpha in `alphas` (each in [0, 1]). `checkpoint`
    defaults to the newest in RUN_DIR/checkpoints: a run with `checkpoint.dir` elsewhere passes that root
    (`pretrain finetune` passes `checkpoint_root(cfg)`).
    Returns {"alphas": [...], "results": [{alpha, top1, top5, loss}], ...}."""
    from pretrain.evaluation.evaluate import eval_device

    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if not alphas or bad:
        raise ValueError(f"--wise-ft: mixing coefficients must be in [0, 1], got {bad or alphas}")
    run_dir = Path(run_dir)
    zs_file = run_dir / ZEROSHOT_FILE
    if not zs_file.is_file():
        raise FileNotFoundError(f"{zs_file}: no zero-shot weights (written when a `pretrain finetune` run "
                                "starts); WiSE-FT interpolates towards them")
    src = open_source(checkpoint or run_dir)
    cfg = src.config
    if cfg.train.task != "classify":
        raise ValueError(f"{src.path}: train.task={cfg.train.task}, not a fine-tuned classifier")
    from safetensors.torch import load_file

    zero_shot, fine_tuned = load_file(str(zs_file)), src.state_dict()
    tokenizer = load_tokenizer(src.meta["tokenizer"])
    model = ClassifierModel.from_config(cfg, len(src.meta["classnames"])).to(eval_device()).eval()
    urls = data or cfg.data.val
    if not urls:
        raise ValueError("--wise-ft needs held-out shards: --val (data.val)")
    bs = batch_size or cfg.eval.batch_size or cfg.train.micro_batch
    n = cfg.eval.max_samples if max_samples is None else max_samples
    rows, samples, skipped = [], 0, {}  # skipped: {reason: count} the loader left out of `samples`
    for alpha in alphas:
        model.load_state_dict(interpolate(zero_shot, fine_tuned, alpha))
        m = classify_metrics(model, tokenizer, cfg, urls, bs, n, workers=workers)
        rows.append({"alpha": alpha, "top1": m["top1"], "top5": m["top5"], "loss": m["loss"]})
        samples, skipped = m["labelled"], m["skipped"]  # the same samples at every alpha
    result = {"data": urls, "samples": samples, "skipped": skipped, "checkpoint": str(src.path),
              "step": src.meta.get("step"), "classes": len(src.meta["classnames"]), "alphas": list(alphas),
              "results": rows}
    if groups.rank() == 0:
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The sweep as a Markdown table (alpha 0 = zero-shot, 1 = fine-tuned)."""
    lines = [f"WiSE-FT on {result['samples']} labelled samples of {result['data']} "
             f"({result['classes']} classes, step {result['step']}):", "",
             "| alpha | top1 | top5 | loss |", "|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['alpha']:g} | {r['top1']:.4f} | {r['top5']:.4f} | {r['loss']:.4f} |")
    return "\n".join(lines)
