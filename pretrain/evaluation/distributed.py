"""Evaluation on every rank: each data-parallel rank encodes its share, features are gathered once, and the
zero-shot and retrieval counts are split by row blocks and summed, so the result equals one process's.

    shards --(rank r of the dp group: its shards, or every dp-th position)--> encode_share
           --> gather_features (all_gather over the dp group, rows sorted back into shard order)
           --> zeroshot_counts / retrieval_counts (row blocks dealt round-robin over all ranks,
               integer hit counts all-reduced) --> metrics

Why it is exact: the gathered rows are in single-process order, every block of rows is scored against
fixed-size column blocks in the same shapes whichever rank scores it, and the outputs are integer counts.
Memory for N pairs is O(N x E) for the gathered features plus one `block x block` score tile: retrieval
never forms the N x N matrix (1M pairs at E=512 need 4 GB of image and text features and one 64 MB tile).

Ranks under ZeRO-3 must run the same number of forwards (every forward gathers parameters collectively):
a rank whose share has run out encodes a one-sample dummy batch while the others finish (`encode_share`).
Tensor-parallel peers hold the same dp rank, so they read the same share and run the same forwards.

Samples the eval loader skips (corrupt image, missing caption, bad shard) are counted per stream and summed
over the ranks (`StreamSkips`, `sum_skips`): every result says how many were left out (`skipped`), and a
warning names the dataset (`warn_skips`), so metrics over fewer samples than the set holds never pass
unnoticed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from data_pipelines.stats import KEPT_REASONS
from data_pipelines.urls import expand_sources
from parallel import groups
from parallel.consensus import sum_counts

log = logging.getLogger("mmpt.eval")

BLOCK = 4096
"""Rows (and columns) per score tile."""


def _distributed() -> bool:
    return groups.is_distributed() and groups.world_size() > 1


def _all_reduce(t: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def encode_share(batches: Iterable[dict[str, Any]],
                 encode: Callable[[dict[str, Any] | None, bool], dict[str, torch.Tensor]],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Run `encode` over this rank's batches, in step with every other rank.

    `encode(batch, uniform)` returns a dict of tensors with one row per sample (features, labels,
    `_order`); `encode(None, False)` must run the same forwards on a dummy input. `uniform` is true when
    every rank holds a batch of the same size this round (what collective losses need). Each round
    all-reduces three integers, so ranks with shorter shares keep calling `encode(None, False)` until the
    longest share is done; a zero-row batch (an eval stream's skip counts, `empty_batches`) is read past,
    not a round. Returns the concatenated rows (zero-row tensors when this rank had no sample but
    another had; an empty dict when no rank had any)."""
    it = iter(batches)
    rows: dict[str, list[torch.Tensor]] = {}
    dummy: dict[str, torch.Tensor] = {}
    while True:
        batch = next(it, None)
        while batch is not None and not len(batch["_order"]):  # as a round it would read as "no rank has
            batch = next(it, None)  # a batch" and end the loop while other batches remain
        b = 0 if batch is None else len(batch["_order"])
        flag = torch.tensor([int(b > 0), b, -b], dtype=torch.int64, device=device)
        if _distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag[0]):
            break
        uniform = batch is not None and int(flag[1]) == -int(flag[2]) == b
        out = encode(batch, uniform)
        if batch is None:
            dummy = {k: v[:0] for k, v in out.items()}
            continue
        for k, v in out.items():
            rows.setdefault(k, []).append(v)
    if rows:
        return {k: torch.cat(v) for k, v in rows.items()}
    return dummy


def gather_features(local: dict[str, torch.Tensor], group: Any = None) -> dict[str, torch.Tensor]:
    """Every rank's rows on every rank, sorted by `_order` (shard, position): the single-process order.

    One all_gather per key over `group` (the data-parallel group: TP peers hold the same rows), padded to
    the longest share; ranks may hold zero rows."""
    if _distributed() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        n = torch.tensor([len(local["_order"])], dtype=torch.int64, device=local["_order"].device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=group)
        sizes = [int(c[0]) for c in counts]
        longest = max(sizes)
        out: dict[str, torch.Tensor] = {}
        for k, v in local.items():
            padded = torch.zeros((longest, *v.shape[1:]), dtype=v.dtype, device=v.device)
            padded[:len(v)] = v
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=group)
            out[k] = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        local = out
    order = local["_order"]
    if len(order) == 0:
        return local
    key = order[:, 0] * (int(order[:, 1].max()) + 1) + order[:, 1]
    perm = torch.argsort(key)
    return {k: v[perm] for k, v in local.items()}


def _my_blocks(n: int, block: int) -> range:
    """Row-block starts this rank scores: block b goes to global rank b % world."""
    world = groups.world_size() if _distributed() else 1
    me = groups.rank() if _distributed() else 0
    return range(me * block, n, world * block)


@torch.no_grad()
def zeroshot_counts(img: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                    block: int = BLOCK) -> dict[str, Any]:
    """Zero-shot top-1/top-5 over the labelled rows (label >= 0): `img` [N, E] and `classifier` [C, E]
    normalised. Returns the summed counts (hits, labelled) of all ranks."""
    k = min(5, classifier.shape[0])
    t = torch.zeros(3, dtype=torch.int64, device=img.device)  # top1 hits, top5 hits, labelled rows
    for start in _my_blocks(len(img), block):
        y = labels[start:start + block]
        has = y >= 0
        if not has.any():
            continue
        top = (img[start:start + block][has] @ classifier.T).topk(k, dim=1).indices
        yl = y[has].unsqueeze(1)
        t[0] += int((top[:, :1] == yl).any(dim=1).sum())
        t[1] += int((top == yl).any(dim=1).sum())
        t[2] += int(has.sum())
    _all_reduce(t)
    return {"top1_hits": int(t[0]), "top5_hits": int(t[1]), "labelled": int(t[2])}


@torch.no_grad()
def _ranks_of_positives(q: torch.Tensor, keys: torch.Tensor, start: int, block: int) -> torch.Tensor:
    """For rows q[start:start+block] (query i pairs with key i): how many keys score strictly higher than
    the paired one. The tile holding the pair is scored first, so the positive score is the same number
    the comparison uses; other tiles follow in order, never more than block x block at once."""
    rows = q[start:start + block]
    own = rows @ keys[start:start + block].T  # [b, b]: the diagonal holds the positives
    pos = own.diagonal().unsqueeze(1)
    higher = (own > pos).sum(dim=1)
    for c in range(0, len(keys), block):
        if c == start:
            continue
        higher += (rows @ keys[c:c + block].T > pos).sum(dim=1)
    return higher


@torch.no_grad()
def retrieval_counts(img: torch.Tensor, txt: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                     block: int = BLOCK) -> dict[str, int]:
    """i2t and t2i recall@k hit counts over N pairs (row i of `img` pairs with row i of `txt`), summed over
    ranks. A pair counts at k when fewer than k other items score strictly higher (ties favour the pair)."""
    t = torch.zeros(2 * len(ks), dtype=torch.int64, device=img.device)
    for start in _my_blocks(len(img), block):
        for d, (q, keys) in enumerate(((img, txt), (txt, img))):
            higher = _ranks_of_positives(q, keys, start, block)
            for i, k in enumerate(ks):
                t[d * len(ks) + i] += int((higher < k).sum())
    _all_reduce(t)
    out = {}
    for d, name in enumerate(("i2t", "t2i")):
        for i, k in enumerate(ks):
            out[f"{name}_r{k}"] = int(t[d * len(ks) + i])
    return out


def check_label_range(labels: torch.Tensor, order: torch.Tensor, classes: int, names: str, urls: str) -> None:
    """ValueError when a `.cls` label indexes past the `classes` names of the class-names file `names`.

    Raised on every rank (`labels` and `order` are the gathered rows, the same everywhere). Without it, the
    class names of another dataset (or a truncated file) count every sample labelled beyond the file as a
    miss, or, clamped for a loss, as another class, and the result reports the wrong classes and chance
    with exit 0. Negative labels mean "unlabelled" and pass."""
    if not len(labels):
        return
    top = int(labels.max())
    if top < classes:
        return
    shards = [u for source in expand_sources(urls) for u in source]
    shard = int(order[int(torch.argmax(labels))][0]) if len(order) == len(labels) else -1
    where = f" (in {shards[shard]})" if 0 <= shard < len(shards) else ""
    beyond = int((labels >= classes).sum())
    raise ValueError(f"{urls}: .cls label {top}{where} but {names} has {classes} names ({beyond} of the "
                     f"{len(labels)} samples have a label >= {classes}); do the labels index that file?")


def metrics_from_features(feats: dict[str, torch.Tensor], classifier: torch.Tensor | None,
                          block: int = BLOCK) -> dict[str, Any]:
    """Zero-shot and retrieval metrics (rounded fractions) of gathered features: keys `samples`,
    `zeroshot_top1/top5` (None without labels or classifier), `i2t_r1/r5`, `t2i_r1/r5`."""
    img, txt, y = feats["image"], feats["text"], feats["cls"]
    n = len(img)
    out: dict[str, Any] = {"samples": int(n)}
    if classifier is not None:
        z = zeroshot_counts(img, y, classifier, block)
        ok = z["labelled"] > 0
        out["zeroshot_top1"] = round(z["top1_hits"] / z["labelled"], 6) if ok else None
        out["zeroshot_top5"] = round(z["top5_hits"] / z["labelled"], 6) if ok else None
        out["labelled"] = z["labelled"]
    r = retrieval_counts(img, txt, (1, 5), block)
    for k, v in r.items():
        out[k] = round(v / max(n, 1), 6)
    return out


# ------------------------------------------------------------------------------------------ skip counts
def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + int(v)


class StreamSkips:
    """This rank's skip counts from the batches of an eval loader (`make_eval_loader(...,
    empty_batches=True)`), read as they pass on to `encode_share` (`watch`).

    `_skips` is cumulative per stream (one DataLoader worker of one rank) and a stream's last batch holds
    its total, so the last counts of each stream are kept and summed. A batch's stream is its first row's
    shard index modulo `workers`, exact when every stream reads whole shards (`stream_workers`); a zero-row
    batch is the only batch of a stream that read no usable sample, so its counts are that stream's total.
    Problems on samples that were kept (`KEPT_REASONS`, e.g. duplicate_key) are not skips and left out."""

    def __init__(self, workers: int) -> None:
        self.workers = max(int(workers), 1)
        self.last: dict[int, dict[str, int]] = {}
        self.unread: dict[str, int] = {}

    def watch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, unchanged, noting each one's `_skips`."""
        for batch in batches:
            skips = batch.get("_skips") or {}
            if not len(batch["_order"]):
                _add_counts(self.unread, skips)
            else:
                self.last[int(batch["_order"][0, 0]) % self.workers] = dict(skips)
            yield batch

    def total(self) -> dict[str, int]:
        """{reason: count} of the skipped samples (and unreadable shards) of the batches seen so far."""
        out: dict[str, int] = {}
        for counts in [*self.last.values(), self.unread]:
            _add_counts(out, {k: v for k, v in counts.items() if k not in KEPT_REASONS})
        return out


def sum_skips(local: dict[str, int], group: Any = None) -> dict[str, int]:
    """Every rank's skip counts summed, on every rank, over `group` (the data-parallel group: TP peers read
    the same share; `parallel.consensus.sum_counts`); every rank of the group must call it."""
    return sum_counts(local, group)


def warn_skips(urls: str, skipped: dict[str, int], samples: int) -> None:
    """One warning (on rank 0) naming the dataset and the counts when it lost samples: the metrics then
    cover fewer samples than the shards hold."""
    if skipped and (groups.rank() if _distributed() else 0) == 0:
        log.warning("eval data %s: %d skipped (%s); the metrics cover the %d samples read", urls,
                    sum(skipped.values()), ", ".join(f"{k} {v}" for k, v in skipped.items()), samples)
