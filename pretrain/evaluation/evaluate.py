"""Zero-shot classification and image<->text retrieval on held-out shards, from a DeepSpeed checkpoint.

Runs in one process on the consolidated fp32 weights (read parameter by parameter from any checkpoint
kind; for ZeRO-3 the same tensors DeepSpeed's zero_to_fp32 gives, which a test checks), so what is
evaluated is exactly what a user converting the checkpoint would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_pipelines.loader import make_eval_loader
from data_pipelines.tokenizer import TextTokenizer
from pretrain.checkpoint.sources import load_tokenizer, open_source
from pretrain.config import Config
from pretrain.models.pretrain_model import PretrainModel

TEMPLATES = (
    "a photo of a {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a {} in the image.",
)


def load_model(checkpoint: str | Path, tag: str | None = None) -> tuple[PretrainModel, TextTokenizer, Config]:
    """Model (eval mode, fp32), tokenizer and config from a run directory, DeepSpeed checkpoint of any
    (dp, tp), universal checkpoint or weights export (`pretrain.checkpoint.sources.open_source`)."""
    src = open_source(checkpoint, tag)
    cfg = src.config
    tokenizer = load_tokenizer(src.meta["tokenizer"])
    model = PretrainModel.from_config(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {src.path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval(), tokenizer, cfg


@torch.no_grad()
def classifier_weights(model: PretrainModel, tokenizer: TextTokenizer, classnames: list[str],
                       context_length: int, templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
    """[C, E] class embeddings: each class's prompt embeddings averaged, then re-normalised."""
    rows = []
    for name in classnames:
        ids = tokenizer.encode_batch([t.format(name) for t in templates], context_length)
        emb = model.encode_text(ids).mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def _recall(sim: torch.Tensor, k: int) -> float:
    """Fraction of rows whose own column (the paired item) is among the top-k scores."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    target = torch.arange(sim.shape[0]).unsqueeze(1)
    return float((top == target).any(dim=1).float().mean())


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str, classnames_file: str | Path, batch_size: int = 128,
             max_samples: int = 0, workers: int = 0, linear_probe: str | None = None,
             model_bundle: tuple[Any, TextTokenizer, Config] | None = None,
             templates: list[str] | None = None, few_shot: int = 0) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (prompt ensemble) and i2t/t2i recall@1/5 on `data`'s held-out samples; with
    `linear_probe` (labelled train shard URLs) also `linear_probe_top1` (`pretrain.evaluation.probe`), and
    with `few_shot` K > 0 also `few_shot_top1` (K per class of those train features).
    `model_bundle` (model, tokenizer, config) evaluates an already loaded model instead of `checkpoint`.
    `templates` ("{}" patterns, e.g. a CLIP_benchmark templates file) replace the built-in TEMPLATES."""
    model, tokenizer, cfg = model_bundle if model_bundle is not None else load_model(checkpoint)
    classnames = [c.strip() for c in Path(classnames_file).read_text().splitlines() if c.strip()]
    if not classnames:
        raise ValueError(f"{classnames_file}: no class names")
    L = cfg.model.text.context_length
    prompts = tuple(templates) if templates else TEMPLATES
    weights = classifier_weights(model, tokenizer, classnames, L, prompts)
    imgs, txts, labels = [], [], []
    loader = make_eval_loader(data, tokenizer, cfg.model.image_size, batch_size, L,
                              cfg.data.mean, cfg.data.std, workers=workers,
                              max_sample_bytes=cfg.data.max_sample_bytes)
    for batch in loader:
        imgs.append(model.encode_image(batch["image"].float()))
        txts.append(model.encode_text(batch["text"]))
        labels.append(batch["cls"])
        if max_samples and sum(len(x) for x in labels) >= max_samples:
            break
    if not imgs:
        raise ValueError(f"{data}: no readable samples to evaluate")
    img, txt, y = torch.cat(imgs), torch.cat(txts), torch.cat(labels)
    if max_samples:
        img, txt, y = img[:max_samples], txt[:max_samples], y[:max_samples]
    out: dict[str, Any] = {"samples": int(len(y)), "classes": len(classnames),
                           "chance": round(1.0 / len(classnames), 6)}
    has_label = y >= 0
    if has_label.any():
        logits = img[has_label] @ weights.T
        top5 = logits.topk(min(5, len(classnames)), dim=1).indices
        yl = y[has_label].unsqueeze(1)
        out["zeroshot_top1"] = round(float((top5[:, :1] == yl).any(dim=1).float().mean()), 6)
        out["zeroshot_top5"] = round(float((top5 == yl).any(dim=1).float().mean()), 6)
    else:
        out["zeroshot_top1"] = out["zeroshot_top5"] = None
    sim = img @ txt.T
    out["i2t_r1"], out["i2t_r5"] = round(_recall(sim, 1), 6), round(_recall(sim, 5), 6)
    out["t2i_r1"], out["t2i_r5"] = round(_recall(sim.T, 1), 6), round(_recall(sim.T, 5), 6)
    if linear_probe:
        from pretrain.evaluation.probe import labelled_image_features
        from pretrain.evaluation.probe import linear_probe as fit_probe

        if not has_label.any():
            raise ValueError(f"--linear-probe: {data} has no labelled (.cls) samples to score the probe on")
        train_x, train_y = labelled_image_features(model, tokenizer, cfg, linear_probe, batch_size)
        out.update(fit_probe(train_x, train_y, img[has_label].numpy(), y[has_label].numpy()))
        if few_shot:
            from pretrain.evaluation.probe import few_shot_probe

            out.update(few_shot_probe(train_x, train_y, img[has_label].numpy(), y[has_label].numpy(),
                                      few_shot, classnames))
    return out
