"""Attribute-binding probe: does the model prefer "red circle left of blue square" to its swaps?

On compositional shards (`pretrain data synth --compositional`), each sample's `.json` names two swaps of
its caption with the same words: `swapped_colours` (the colours trade shapes) and `swapped_objects` (the
two objects trade places). Pairwise accuracy = the fraction of images whose true caption scores above
the swap (a tie counts one half), for the dual encoder (cosine of the CLIP features) and, with a fusion
encoder and ITM head, for the match score. Chance is 0.5; a bag of words cannot beat it.

With the image-conditioned MLM (`objectives.mlm.conditioned`), `binding_relation_mlm` asks the fusion encoder
for the caption's relation word: "red circle [MASK] of blue square" -- the caption alone cannot say whether
"left" or "right" belongs there, only where the red circle is in the image. Pairwise accuracy of the true
word's logit over the other's, chance 0.5.

Cheap (three captions per image), so under a launcher every rank runs the whole probe on its replica
and gets the same numbers without collectives; single-process it is the same code. Samples its loader
skips are reported as `binding_skipped` ({reason: count}, `StreamSkips`); each rank reads every shard,
so its counts already are the set's (summing over ranks would multiply them).
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

import torch

from data_pipelines.loader import make_eval_loader
from data_pipelines.urls import expand_urls, is_local, local_path
from pretrain.evaluation.distributed import StreamSkips

SWAPS = ("swapped_colours", "swapped_objects")
RELATION_WORDS = ("left", "right")


def read_shard_metadata(urls: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(shard URL, sample key) -> the sample's parsed `.json`, for every sample of the local shards `urls`
    (plain paths or file: URLs) that has one. Keyed by shard too: webdataset lets every shard number its
    samples from 0, so a key alone would give one shard's swaps to another's images. Keys are split from
    member names as the loader splits them (`base_plus_ext`). An unreadable shard or `.json` is passed over
    here: the loader skips and counts it (`binding_skipped`), as the main pass does."""
    from webdataset.tariterators import base_plus_ext

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for url in expand_urls(urls):
        if not is_local(url):
            continue
        try:
            with tarfile.open(local_path(url)) as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                    if key is None or ext is None or ext.lower() != "json":
                        continue
                    f = tar.extractfile(member)
                    try:
                        out[(url, key)] = json.loads(f.read()) if f is not None else {}
                    except ValueError:
                        continue
        except (tarfile.TarError, OSError):
            continue
    return out


def read_metadata(urls: str) -> dict[str, dict[str, Any]]:
    """Sample key -> its parsed `.json` (`read_shard_metadata` without the shard), for shards whose keys are
    unique across `urls`; a key in two shards is refused by name rather than one shard's entry dropped."""
    out: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for (url, key), meta in read_shard_metadata(urls).items():
        if key in where and where[key] != url:
            raise ValueError(f"sample key {key!r} is in both {where[key]} and {url}: look metadata up by "
                             "(shard, key) with read_shard_metadata")
        out[key], where[key] = meta, url
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


def relation_ids(tokenizer: Any, context_length: int) -> tuple[int, int] | None:
    """The token ids of "left" and "right", or None when the tokenizer splits either into several tokens."""
    out = []
    for word in RELATION_WORDS:
        ids = tokenizer.encode_batch([word], context_length)[0].tolist()
        body = ids[1:ids.index(tokenizer.eos_id)]  # between BOS and EOS
        if len(body) != 1:
            return None
        out.append(body[0])
    return out[0], out[1]


def _relation_hits(model: Any, mask_id: int, ids: torch.Tensor, img_tok: torch.Tensor,
                   rel: tuple[int, int]) -> tuple[float, int]:
    """(Summed pairwise accuracy, captions scored): each caption holding exactly one relation word gets it
    masked, and the conditioned MLM's logit for the true word is compared with the other's."""
    left, right = rel
    is_rel = (ids == left) | (ids == right)  # [b, L]
    rows = is_rel.sum(dim=1) == 1  # [b]
    if not rows.any():
        return 0.0, 0
    ids, img_tok, is_rel = ids[rows], img_tok[rows], is_rel[rows]
    r = torch.arange(len(ids), device=ids.device)
    pos = is_rel.float().argmax(dim=1)  # [b]
    truth = ids[r, pos]
    other = torch.where(truth == left, torch.full_like(truth, right), torch.full_like(truth, left))
    masked = ids.clone()
    masked[r, pos] = mask_id
    logits = model.mlm_logits(masked, img_tok)[r, pos].float()  # [b, V]
    true_s, other_s = logits.gather(1, truth[:, None]), logits.gather(1, other[:, None])
    return float(_pairwise(true_s, other_s).sum()), len(ids)


@torch.no_grad()
def binding_probe(model: Any, tokenizer: Any, cfg: Any, urls: str, max_samples: int = 0,
                  batch_size: int = 128) -> dict[str, Any]:
    """Keys `binding_samples`, `binding_{colours,objects}_contrastive`, with an ITM head
    `binding_{colours,objects}_itm`, and with the conditioned MLM `binding_relation_mlm` (pairwise
    accuracies, chance 0.5), and `binding_skipped`: the samples this probe's loader left out ({reason:
    count}, as the main pass's `skipped`; each rank reads all of `urls`, so no sum over ranks)."""
    meta = read_shard_metadata(urls)
    shards = expand_urls(urls)  # the loader's shard order: `_order`[:, 0] indexes this list
    device = next(model.parameters()).device
    L = cfg.model.text.context_length
    loader = make_eval_loader(urls, tokenizer, cfg.model.image_size, batch_size, L, cfg.data.mean,
                              cfg.data.std, max_sample_bytes=cfg.data.max_sample_bytes,
                              max_samples=max_samples, empty_batches=True)
    skips = StreamSkips(0)
    fusion = getattr(model, "itm_head", None) is not None
    rel = (relation_ids(tokenizer, L) if getattr(model, "mlm_head", None) is not None
           and cfg.objectives.mlm.conditioned else None)
    rel_sum, rel_n = 0.0, 0
    sums = {f"{s}_{kind}": 0.0 for s in ("colours", "objects") for kind in ("contrastive", "itm")}
    n = 0
    for batch in skips.watch(loader):
        ids_of = [(shards[s], k) for (s, _), k in zip(batch["_order"].tolist(), batch["_keys"])]
        keep = [i for i, k in enumerate(ids_of) if all(s in meta.get(k, {}) for s in SWAPS)]
        if not keep:
            continue
        keys = [ids_of[i] for i in keep]
        images = batch["image"][keep].to(device, torch.float32)
        img_f = model.encode_image(images)  # [b, E] normalised
        img_tok = model.image_tokens(images) if fusion or rel else None  # [b, 1 + N, W]
        true_ids = batch["text"][keep].to(device)

        cos_true, itm_true = _scores(model, img_f, img_tok, true_ids)
        for swap, name in zip(SWAPS, ("colours", "objects")):
            ids = tokenizer.encode_batch([meta[k][swap] for k in keys], L).to(device)
            cos, itm = _scores(model, img_f, img_tok, ids)
            sums[f"{name}_contrastive"] += float(_pairwise(cos_true, cos).sum())
            if fusion:
                sums[f"{name}_itm"] += float(_pairwise(itm_true, itm).sum())  # type: ignore[arg-type]
        if rel is not None:
            hits, scored = _relation_hits(model, tokenizer.mask_id, true_ids, img_tok, rel)
            rel_sum, rel_n = rel_sum + hits, rel_n + scored
        n += len(keep)
    skipped = skips.total()
    if n == 0:
        raise ValueError(f"--binding: no sample of {urls} has swapped captions in its .json; write "
                         "compositional shards with `pretrain data synth --compositional`"
                         + (f" (skipped: {skipped})" if skipped else ""))
    out: dict[str, Any] = {"binding_samples": n, "binding_skipped": skipped}
    for k, v in sums.items():
        if fusion or k.endswith("contrastive"):
            out[f"binding_{k}"] = round(v / n, 6)
    if rel_n:
        out["binding_relation_mlm"] = round(rel_sum / rel_n, 6)
    return out
