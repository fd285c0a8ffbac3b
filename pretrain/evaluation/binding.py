"""Attribute-binding probe: does the model prefer "red circle left of blue square" to its swaps?

On compositional shards (`pretrain data synth --compositional`), each sample's `.json` names two swaps of
its caption with the same words: `swapped_colours` (the colours trade shapes) and `swapped_objects` (the
two objects trade places). Pairwise accuracy = the fraction of images whose true caption scores above
the swap (a tie counts one half), for the dual encoder (cosine of the CLIP features) and, with a fusion
encoder and ITM head, for the match score. Chance is 0.5; a bag of words cannot beat it.

Cheap (three captions per image), so under a launcher every rank runs the whole probe on its replica
and gets the same numbers without collectives; single-process it is the same code.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

import torch

from data_pipelines.loader import make_eval_loader
from data_pipelines.urls import expand_urls

SWAPS = ("swapped_colours", "swapped_objects")


def read_metadata(urls: str) -> dict[str, dict[str, Any]]:
    """Sample key -> its parsed `.json`, for every sample of the (local) shards `urls` that has one."""
    out: dict[str, dict[str, Any]] = {}
    for url in expand_urls(urls):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    f = tar.extractfile(member)
                    if f is not None:
                        out[member.name[:-len(".json")]] = json.loads(f.read())
    return out


def _pairwise(true: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """1 where the true caption scores higher, 0.5 on a tie, 0 below."""
    return (true > swapped).double() + 0.5 * (true == swapped).double()


def _scores(model: Any, img_f: torch.Tensor, img_tok: torch.Tensor | None, ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image: cosine with caption `ids` (dual encoder) and, given image tokens, the ITM score."""
    cos = (img_f * model.encode_text(ids)).sum(dim=-1)
    itm = model.itm_score(model.text_tokens(ids), ids, img_tok) if img_tok is not None else None
    return cos, itm


@torch.no_grad()
def binding_probe(model: Any, tokenizer: Any, cfg: Any, urls: str, max_samples: int = 0,
                  batch_size: int = 128) -> dict[str, Any]:
    """Keys `binding_samples`, `binding_{colours,objects}_contrastive` and, with an ITM head,
    `binding_{colours,objects}_itm` (pairwise accuracies, chance 0.5)."""
    meta = read_metadata(urls)
    device = next(model.parameters()).device
    L = cfg.model.text.context_length
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size, L, cfg.data.mean,
                              cfg.data.std, max_sample_bytes=cfg.data.max_sample_bytes,
                              max_samples=max_samples)
    fusion = getattr(model, "itm_head", None) is not None
    sums = {f"{s}_{kind}": 0.0 for s in ("colours", "objects") for kind in ("contrastive", "itm")}
    n = 0
    for batch in loader:
        keep = [i for i, k in enumerate(batch["_keys"]) if all(s in meta.get(k, {}) for s in SWAPS)]
        if not keep:
            continue
        keys = [batch["_keys"][i] for i in keep]
        images = batch["image"][keep].to(device, torch.float32)
        img_f = model.encode_image(images)  # [b, E] normalised
        img_tok = model.image_tokens(images) if fusion else None  # [b, 1 + N, W]
        true_ids = batch["text"][keep].to(device)

        cos_true, itm_true = _scores(model, img_f, img_tok, true_ids)
        for swap, name in zip(SWAPS, ("colours", "objects")):
            ids = tokenizer.encode_batch([meta[k][swap] for k in keys], L).to(device)
            cos, itm = _scores(model, img_f, img_tok, ids)
            sums[f"{name}_contrastive"] += float(_pairwise(cos_true, cos).sum())
            if fusion:
                sums[f"{name}_itm"] += float(_pairwise(itm_true, itm).sum())  # type: ignore[arg-type]
        n += len(keep)
    if n == 0:
        raise ValueError(f"--binding: no sample of {urls} has swapped captions in its .json; write "
                         "compositional shards with `pretrain data synth --compositional`")
    out: dict[str, Any] = {"binding_samples": n}
    for k, v in sums.items():
        if fusion or k.endswith("contrastive"):
            out[f"binding_{k}"] = round(v / n, 6)
    return out
