"""`pretrain embed --sharded`: embeddings of many shards as one output shard per input shard, resumable.

    OUT/000017.image.npy   float32 [n, E]   rows of input shard 17, in its sample order
    OUT/000017.text.npy    float32 [n, E]
    OUT/000017.parquet     row, key, position (in the input shard), cls, url: one row per embedding row
    OUT/embed.json         written before the first shard: what makes the rows (checkpoint, backend, dtype,
                           the expanded input shard list)
    OUT/index.json         written at the end: shards, rows, skips (summed over every finished shard's own
                           counts, kept in its parquet's schema metadata), checkpoint, backend, dtype

Output shard i belongs to input shard i (of the expanded URL list), so concatenating them in name order
gives the rows in input order. Each output shard's .npy files are written under temporary names and
renamed, and its .parquet last: a shard is finished exactly when its .parquet exists, and a rerun with the
same arguments skips finished shards and encodes only the rest (an interrupted run resumes without
recomputing them). "Same arguments" is enforced, not assumed: `claim` compares the rerun's fingerprint
with the folder's embed.json and refuses a folder made by another checkpoint, backend, dtype or input list
(resuming there would mix rows of two models, or leave shards of inputs no longer asked for). Shards are
encoded in groups of `workers` (each DataLoader worker decodes one whole shard of the group while the main
process encodes), and a group is written as soon as it is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.files import write_text_atomic
from data_pipelines.urls import expand_sources

__all__ = ["FINGERPRINT", "checkpoint_identity", "claim", "embed_sharded", "finished", "fingerprint",
           "shard_name"]

FINGERPRINT = "embed.json"
"""What produced a sharded embedding folder; a resume must match it."""


def shard_name(i: int) -> str:
    return f"{i:06d}"


def finished(out: Path, i: int) -> bool:
    return (out / f"{shard_name(i)}.parquet").is_file()


def checkpoint_identity(checkpoint: str | Path) -> dict[str, Any]:
    """{"path", "tag", "sha256"} of the checkpoint `pretrain embed` reads, found without loading it: the
    resolved folder (a run directory resolves to its newest tag, so further training changes the identity)
    and the sha256 of its integrity file (DeepSpeed completion marker, or manifest.json of a universal or
    weights folder; each lists the sha256 of every file), None where there is none. A path that is no
    checkpoint gets its own path here; loading it then fails with the reader's own message."""
    from pretrain.checkpoint import atomic as ckpt
    from pretrain.checkpoint.sources import is_universal, is_weights
    from pretrain.checkpoint.tensor_files import MANIFEST, file_sha256

    p = Path(checkpoint)
    folder, tag, integrity = p, None, p / MANIFEST
    if not (is_universal(p) or is_weights(p)):
        try:
            found = ckpt.resolve(str(p), p / "checkpoints")
        except (OSError, ValueError):
            found = None
        if found is not None:
            folder, tag = found[0] / found[1], found[1]
            integrity = folder / ckpt.MARKER
    return {"path": str(folder.resolve()), "tag": tag,
            "sha256": file_sha256(integrity) if integrity.is_file() else None}


def fingerprint(checkpoint: str | Path, backend: str, dtype: str, urls: str) -> dict[str, Any]:
    """Everything that changes the rows of a sharded embedding folder: the checkpoint (which fixes the model,
    tokenizer, image size and normalisation), the encoder backend and dtype, and the expanded shard list."""
    return {"format": "mmpt-embeddings-fingerprint", "version": 1,
            "checkpoint": checkpoint_identity(checkpoint), "backend": backend, "dtype": dtype,
            "shards": [u for source in expand_sources(urls) for u in source]}


def _same_checkpoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("sha256") and b.get("sha256"):  # same files wherever they are (a moved or copied run)
        return a["sha256"] == b["sha256"]
    return (a.get("path"), a.get("tag"), a.get("sha256")) == (b.get("path"), b.get("tag"), b.get("sha256"))


def _show_checkpoint(c: dict[str, Any]) -> str:
    return str(c.get("path")) + (f" (sha256 {c['sha256'][:12]})" if c.get("sha256") else "")


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first way `new` differs from the folder's `old` fingerprint, in words; None when it does not."""
    if not _same_checkpoint(old.get("checkpoint") or {}, new["checkpoint"]):
        return (f"checkpoint {_show_checkpoint(old.get('checkpoint') or {})} there, "
                f"{_show_checkpoint(new['checkpoint'])} now")
    for key in ("backend", "dtype"):
        if old.get(key) != new[key]:
            return f"--{key} {old.get(key)} there, {new[key]} now"
    was, now = list(old.get("shards") or []), new["shards"]
    if was != now:
        i = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
        there, here = (was[i] if i < len(was) else "(none)"), (now[i] if i < len(now) else "(none)")
        return (f"--data lists {len(was)} input shards there, {len(now)} now; shard {i}: {there} there, "
                f"{here} now")
    return None


def _has_output(out: Path) -> bool:
    return any(out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].*"))


def claim(out: Path, fp: dict[str, Any]) -> None:
    """Make `out` the folder of the run `fp` describes, before anything is encoded: write its fingerprint
    (temporary name, then renamed) unless it is already there. A folder holding output shards of another
    run (or of one that recorded no fingerprint) is refused with one line naming the folder and what
    differs: resuming there would mix rows of two runs under one index."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / FINGERPRINT
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--out {out}: {path.name} is unreadable ({e}); choose a new --out") from None
    if _has_output(out):
        why = "it has no " + FINGERPRINT + " to tell what made them" if old is None else _difference(old, fp)
        if why is not None:
            raise ValueError(f"--out {out} holds embeddings of another run ({why}); resuming there would mix "
                             "them: choose a new --out")
        if old == fp:
            return
    write_text_atomic(path, json.dumps(fp, indent=1) + "\n")


def _write_shard(out: Path, i: int, url: str, image: np.ndarray, text: np.ndarray, keys: list[str],
                 positions: list[int], cls: list[int], skips: dict[str, int]) -> None:
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
    # the shard's skip counts travel in the file that marks it finished: index.json sums them over every
    # finished shard, so a run that stopped before writing its index loses none on the rerun
    table = table.replace_schema_metadata({SKIPS_KEY: json.dumps(skips, sort_keys=True)})
    tmp = out / f".{name}.parquet{tag}"
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"{name}.parquet")  # last: marks the shard finished


SKIPS_KEY = "mmpt_skips"
"""Parquet schema-metadata key of a shard's skip counts ({reason: count}, JSON)."""


def shard_skips(out: Path, i: int) -> dict[str, int]:
    """The skip counts recorded in finished shard `i` of `out` ({} for a shard written without them)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(out / f"{shard_name(i)}.parquet").metadata or {}
    raw = meta.get(SKIPS_KEY.encode())
    return {k: int(v) for k, v in json.loads(raw).items()} if raw else {}


def _add_skips(total: dict[str, int], skips: dict[str, int]) -> None:
    for k, v in skips.items():
        total[k] = total.get(k, 0) + int(v)


def embed_sharded(encoder: Any, tokenizer: Any, cfg: Any, urls: str, out: Path, batch_size: int,
                  workers: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode every input shard of `urls` not yet finished in `out`; returns the index written. The caller
    `claim`s `out` first (`pretrain.evaluation.embed.embed` does), so finished shards are this run's."""
    from data_pipelines.loader import make_eval_loader

    shards = [u for source in expand_sources(urls) for u in source]
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(shards)) if not finished(out, i)]
    group = max(1, workers)
    dim = cfg.model.embed_dim
    for start in range(0, len(todo), group):
        ids = todo[start:start + group]
        loader = make_eval_loader("::".join(shards[i] for i in ids), tokenizer, cfg.model.image_size,
                                  batch_size, cfg.model.text.context_length, cfg.data.mean, cfg.data.std,
                                  workers=min(workers, len(ids)), max_sample_bytes=cfg.data.max_sample_bytes,
                                  empty_batches=True)
        fields = ("image", "text", "keys", "pos", "cls")
        rows: dict[int, dict[str, list[Any]]] = {j: {f: [] for f in fields} for j in range(len(ids))}
        last_skips: dict[int, dict[str, int]] = {}  # cumulative per worker, and a worker reads one shard
        for batch in loader:
            if not batch["_keys"]:  # a worker whose shard held no usable sample: its one batch, only skips
                last_skips[batch["_stream"]] = batch["_skips"]
                continue
            order = batch["_order"].tolist()
            j = order[0][0]  # one worker per shard of the group: a batch never spans two shards
            r = rows[j]
            r["image"].append(encoder.encode_image(batch["image"]).numpy())
            r["text"].append(encoder.encode_text(batch["text"]).numpy())
            r["keys"].extend(batch["_keys"])
            r["pos"].extend(p for _, p in order)
            r["cls"].extend(batch["cls"].tolist())
            last_skips[j] = batch["_skips"]
        for j, i in enumerate(ids):
            r = rows[j]
            empty = np.zeros((0, dim), np.float32)
            image = np.concatenate(r["image"]) if r["image"] else empty
            text = np.concatenate(r["text"]) if r["text"] else empty
            _write_shard(out, i, shards[i], image, text, r["keys"], r["pos"], r["cls"], last_skips.get(j, {}))
    return _write_index(out, shards, todo, dim, extra or {})


def _write_index(out: Path, shards: list[str], encoded: Iterable[int], dim: int,
                 extra: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    total_skips: dict[str, int] = {}
    for i in range(len(shards)):  # every shard's own counts, this run's or an earlier one's
        _add_skips(total_skips, shard_skips(out, i))
    entries = [{"shard": shard_name(i), "url": u, "rows": pq.read_metadata(out / f"{shard_name(i)}.parquet")
                .num_rows} for i, u in enumerate(shards)]
    index = {"format": "mmpt-embeddings", "version": 1, "embed_dim": dim, **extra,
             "rows": sum(e["rows"] for e in entries), "shards": entries,
             "encoded_this_run": len(list(encoded)), "skips": total_skips}
    write_text_atomic(out / "index.json", json.dumps(index, indent=1) + "\n")
    return index
