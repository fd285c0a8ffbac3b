"""`pretrain embed --sharded`: embeddings of many shards as one output shard per input shard, resumable.

    OUT/000017.image.npy   float32 [n, E]   rows of input shard 17, in its sample order
    OUT/000017.text.npy    float32 [n, E]
    OUT/000017.parquet     row, key, position (in the input shard), cls, url: one row per embedding row
    OUT/index.json         written at the end: shards, rows, skips, backend, dtype, embed_dim

Output shard i belongs to input shard i (of the expanded URL list), so concatenating them in name order
gives the rows in input order. Each output shard's .npy files are written under temporary names and
renamed, and its .parquet last: a shard is finished exactly when its .parquet exists, and a rerun with the
same arguments skips finished shards and encodes only the rest (an interrupted run resumes without
recomputing them). Shards are encoded in groups of `workers` (each DataLoader worker decodes one whole
shard of the group while the main process encodes), and a group is written as soon as it is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.urls import expand_sources

__all__ = ["embed_sharded", "finished", "shard_name"]


def shard_name(i: int) -> str:
    return f"{i:06d}"


def finished(out: Path, i: int) -> bool:
    return (out / f"{shard_name(i)}.parquet").is_file()


def _write_shard(out: Path, i: int, url: str, image: np.ndarray, text: np.ndarray, keys: list[str],
                 positions: list[int], cls: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name, tag = shard_name(i), f".tmp{os.getpid()}"
    for kind, arr in (("image", image), ("text", text)):
        tmp = out / f".{name}.{kind}.npy{tag}"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr, dtype=np.float32))
        os.replace(tmp, out / f"{name}.{kind}.npy")
    table = pa.table({"row": pa.array(range(len(keys)), pa.int64()), "key": pa.array(keys, pa.string()),
                      "position": pa.array(positions, pa.int64()), "cls": pa.array(cls, pa.int64()),
                      "url": pa.array([url] * len(keys), pa.string())})
    tmp = out / f".{name}.parquet{tag}"
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"{name}.parquet")  # last: marks the shard finished


def _add_skips(total: dict[str, int], skips: dict[str, int]) -> None:
    for k, v in skips.items():
        total[k] = total.get(k, 0) + int(v)


def embed_sharded(encoder: Any, tokenizer: Any, cfg: Any, urls: str, out: Path, batch_size: int,
                  workers: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode every input shard of `urls` not yet finished in `out`; returns the index written."""
    from data_pipelines.loader import make_eval_loader

    shards = [u for source in expand_sources(urls) for u in source]
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(shards)) if not finished(out, i)]
    group = max(1, workers)
    skips: dict[str, int] = {}
    dim = cfg.model.embed_dim
    for start in range(0, len(todo), group):
        ids = todo[start:start + group]
        loader = make_eval_loader("::".join(shards[i] for i in ids), tokenizer, cfg.model.image_size,
                                  batch_size, cfg.model.text.context_length, cfg.data.mean, cfg.data.std,
                                  workers=min(workers, len(ids)), max_sample_bytes=cfg.data.max_sample_bytes,
                                  empty_batches=True)
        fields = ("image", "text", "keys", "pos", "cls")
        rows: dict[int, dict[str, list[Any]]] = {j: {f: [] for f in fields} for j in range(len(ids))}
        last_skips: dict[int, dict[str, int]] = {}
        for batch in loader:
            if not batch["_keys"]:  # a worker whose shard held no usable sample: its one batch, only skips
                _add_skips(skips, batch["_skips"])
                continue
            order = batch["_order"].tolist()
            j = order[0][0]  # one worker per shard of the group: a batch never spans two shards
            r = rows[j]
            r["image"].append(encoder.encode_image(batch["image"]).numpy())
            r["text"].append(encoder.encode_text(batch["text"]).numpy())
            r["keys"].extend(batch["_keys"])
            r["pos"].extend(p for _, p in order)
            r["cls"].extend(batch["cls"].tolist())
            last_skips[j] = batch["_skips"]  # cumulative per worker, and a worker reads one shard here
        for j, i in enumerate(ids):
            r = rows[j]
            empty = np.zeros((0, dim), np.float32)
            image = np.concatenate(r["image"]) if r["image"] else empty
            text = np.concatenate(r["text"]) if r["text"] else empty
            _write_shard(out, i, shards[i], image, text, r["keys"], r["pos"], r["cls"])
            _add_skips(skips, last_skips.get(j, {}))
    return _write_index(out, shards, todo, skips, dim, extra or {})


def _write_index(out: Path, shards: list[str], encoded: Iterable[int], skips: dict[str, int], dim: int,
                 extra: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    previous: dict[str, Any] = {}
    if (out / "index.json").is_file():
        previous = json.loads((out / "index.json").read_text())
    total_skips = dict(previous.get("skips", {}))
    _add_skips(total_skips, skips)
    entries = [{"shard": shard_name(i), "url": u, "rows": pq.read_metadata(out / f"{shard_name(i)}.parquet")
                .num_rows} for i, u in enumerate(shards)]
    index = {"format": "mmpt-embeddings", "version": 1, "embed_dim": dim, **extra,
             "rows": sum(e["rows"] for e in entries), "shards": entries,
             "encoded_this_run": len(list(encoded)), "skips": total_skips}
    tmp = out / f".index.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / "index.json")
    return index
