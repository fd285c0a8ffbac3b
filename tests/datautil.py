"""Helpers shared by the data-pipeline tests: tiny configs and draining training streams by epoch."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipelines.loader import TrainLoader, make_train_loader
from data_pipelines.synth import make_sample
from data_pipelines.tokenizer import TextTokenizer, train_tokenizer
from pretrain.config import Config, stream_spec

SIZE, PATCH, CTX = 32, 8, 16


def train_loader(cfg: Config, tok: TextTokenizer, **kwargs: Any) -> TrainLoader:
    """`make_train_loader` as training calls it, from a whole Config."""
    return make_train_loader(cfg.data, stream_spec(cfg), tok, **kwargs)


def tiny_tokenizer() -> TextTokenizer:
    return train_tokenizer([make_sample(i, 8, 0)["txt"].decode() for i in range(200)], vocab_size=200)


def tiny_cfg(train: str, workers: int = 0, batch: int = 4, buffer: int = 8, interleave: int = 2,
             seed: int = 5) -> Config:
    cfg = Config()
    cfg.data.train = train
    cfg.data.workers = workers
    cfg.data.shuffle_buffer = buffer
    cfg.data.interleave = interleave
    cfg.train.micro_batch = batch
    cfg.train.seed = seed
    cfg.model.image_size = SIZE
    cfg.model.vision.patch_size = PATCH
    cfg.model.text.context_length = CTX
    return cfg


def sample_keys(batch: dict[str, Any]) -> list[tuple[int, str]]:
    """(epoch, key) of every sample of a batch."""
    return list(zip(batch["_epochs"], batch["_keys"]))


def take(loader: TrainLoader, n: int) -> list[dict[str, Any]]:
    """The next `n` batches, recorded as consumed by the loader's tracker (like the trainer does)."""
    batches = list(islice(iter(loader), n))
    for b in batches:
        loader.tracker.update(b)
    return batches


def drain(loader: TrainLoader, until_epoch: int, limit: int = 2000) -> list[dict[str, Any]]:
    """Consume batches until every worker of the loader has moved on to `until_epoch` (so this rank has
    delivered all of its samples of earlier epochs); every batch is recorded by the tracker."""
    workers = loader.tracker.num_workers
    reached: set[int] = set()
    out = []
    for batch in islice(iter(loader), limit):
        loader.tracker.update(batch)
        out.append(batch)
        if batch["_position"]["epoch"] >= until_epoch:
            reached.add(batch["_position"]["worker"])
        if len(reached) == workers:
            return out
    raise AssertionError(f"workers {sorted(set(range(workers)) - reached)} never reached epoch {until_epoch}")


def run_ranks(cfg: Config, tok: TextTokenizer, world: int, batches: int | None = None,
              until_epoch: int | None = None, position: list[dict] | None = None
              ) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
    """Simulate `world` data-parallel ranks: each consumes `batches` batches (or drains to `until_epoch`).

    Returns every consumed (epoch, key) and the checkpoint's `data_positions` list (JSON round-tripped).
    """
    keys: list[tuple[int, str]] = []
    positions = []
    for rank in range(world):
        loader = train_loader(cfg, tok, rank=rank, world=world, position=position)
        got = take(loader, batches) if batches is not None else drain(loader, until_epoch)
        keys += [k for b in got for k in sample_keys(b)]
        positions.append(json.loads(json.dumps(loader.tracker.state())))
    return keys, positions


def assert_exactly_once(keys: list[tuple[int, str]], epoch: int, expected: set[str]) -> None:
    """Every expected key consumed exactly once in `epoch`, nothing else."""
    counts = Counter(k for e, k in keys if e == epoch)
    twice = sorted(k for k, c in counts.items() if c > 1)
    missing = sorted(expected - set(counts))
    extra = sorted(set(counts) - expected)
    assert not twice and not missing and not extra, (
        f"epoch {epoch}: {len(twice)} twice {twice[:5]}, {len(missing)} missing {missing[:5]}, "
        f"{len(extra)} unexpected {extra[:5]}")


# ------------------------------------------------------------------------- deliberately corrupted shards
EXPECTED_SKIPS = {"bad_image": 3, "missing_caption": 1, "empty_caption": 1, "bad_text": 1, "missing_image": 1,
                  "image_too_large": 1, "bad_shard": 3}
"""What `write_corrupt_shards` holds, with data.max_image_pixels=1000000 (the 2000 x 2000 PNG is a bomb)."""
GOOD_A, GOOD_B, GOOD_E = 10, 4, 8


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (40, 30), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard written by hand with the standard library, members in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_members(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"{prefix}{i:03d}.jpg", image_bytes(colour=(20 * i, 90, 160))),
                                          (f"{prefix}{i:03d}.txt", f"a red square {prefix} {i}".encode()))]


def write_corrupt_shards(d: Path) -> tuple[str, set[str]]:
    """Shards C (not a tar), D (failing pipe:), A (mixed bad samples), B (truncated), E (good), in this
    order; returns (spec, keys of the good samples)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "c.tar").write_bytes(b"this is not a tar archive at all" * 40)
    bad = [
        ("garbage1.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("garbage1.txt", b"a caption"),
        ("garbage2.jpg", b"\x00" * 300), ("garbage2.txt", b"a caption"),
        ("truncjpg.jpg", image_bytes()[:80]), ("truncjpg.txt", b"a caption"),
        ("nocaption.jpg", image_bytes()),
        ("emptycap.jpg", image_bytes()), ("emptycap.txt", b" \n\t "),
        ("badutf8.jpg", image_bytes()), ("badutf8.txt", b"\xc3\x28 not utf-8"),
        ("noimage.txt", b"a caption without its image"),
        ("bomb.png", image_bytes("PNG", (2000, 2000), (0, 0, 0))), ("bomb.txt", b"a huge black square"),
    ]
    good_a = good_members("a", GOOD_A)
    write_tar(d / "a.tar", bad[:7] + good_a[:10] + bad[7:] + good_a[10:])
    write_tar(d / "b.tar", good_members("b", 6))
    with tarfile.open(d / "b.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == f"b{GOOD_B:03d}.jpg").offset_data + 20
    (d / "b.tar").write_bytes((d / "b.tar").read_bytes()[:cut])  # inside the 5th sample's image
    write_tar(d / "e.tar", good_members("e", GOOD_E))
    spec = f"{d}/c.tar::pipe:cat {d}/does-not-exist.tar::{d}/a.tar::{d}/b.tar::{d}/e.tar"
    keys = {f"a{i:03d}" for i in range(GOOD_A)} | {f"b{i:03d}" for i in range(GOOD_B)} | \
        {f"e{i:03d}" for i in range(GOOD_E)}
    return spec, keys


def read_back(out: Path) -> dict[str, dict]:
    """An import's output shards (listed in its stats.json) read with plain webdataset: key -> members."""
    import webdataset as wds

    urls = [str(out / s["name"]) for s in json.loads((out / "stats.json").read_text())["shards"]]
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


def opts(**kw: Any) -> Any:
    """Import options for tests: in-process (no loader workers), no progress bar."""
    from data_pipelines.importers import ImportOptions

    return ImportOptions(workers=0, progress=False, **kw)
