"""Training/eval streams: layout-independent sharding, exact resume, plain tars, bad data counted.

Exact coverage under many layouts and elastic resume are in test_data_coverage.py / test_data_resume.py."""

import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from datautil import train_loader
from PIL import Image

from data_pipelines.loader import make_eval_loader
from data_pipelines.stats import DataQualityError
from data_pipelines.synth import write_synthetic_shards
from data_pipelines.tokenizer import SOS_ID
from data_pipelines.urls import expand_urls
from pretrain.config import Config

SIZE, PATCH, CTX = 32, 8, 16
MODEL_KEYS = ("image", "text", "mlm_input", "mlm_labels", "patch_noise", "cls")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """8 shards x 8 samples: per epoch each of 2 ranks x 2 workers reads exactly 2 shards."""
    out = tmp_path_factory.mktemp("shards")
    return write_synthetic_shards(out, samples=64, samples_per_shard=8, image_size=40, seed=0)


def _cfg(train: str, workers: int = 0, batch: int = 4, buffer: int = 10) -> Config:
    cfg = Config()
    cfg.data.train = train
    cfg.data.workers = workers
    cfg.data.shuffle_buffer = buffer
    cfg.train.micro_batch = batch
    cfg.train.seed = 5
    cfg.model.image_size = SIZE
    cfg.model.vision.patch_size = PATCH
    cfg.model.text.context_length = CTX
    return cfg


def _take(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard written by hand with the standard library (no webdataset writer, no .json members)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(colour=(200, 30, 30), size=(48, 36), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- urls
def test_expand_urls(shards, tmp_path):
    urls = expand_urls(shards["urls"])
    assert urls == shards["files"]
    both = expand_urls(f"{shards['files'][0]}::{shards['out_dir']}/shard-{{000001,000002}}.tar")
    assert both == shards["files"][:3]
    assert expand_urls("pipe:cat a{0..1}.tar::https://x/y.tar") == ["pipe:cat a0.tar", "pipe:cat a1.tar",
                                                                    "https://x/y.tar"]
    with pytest.raises(ValueError, match="do not exist.*nope-1.tar"):
        expand_urls(f"{tmp_path}/nope-{{0..1}}.tar")
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls("")
    with pytest.raises(ValueError, match="expands to no URLs"):
        expand_urls(f"{shards['files'][0]}::")


# ------------------------------------------------------------------------------------------ batches
def test_batch_shapes_and_dtypes(shards, tiny_tok):
    (batch,) = _take(train_loader(_cfg(shards["urls"]), tiny_tok, rank=0, world=1), 1)
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    for key in ("text", "mlm_input", "mlm_labels"):
        assert batch[key].shape == (4, CTX) and batch[key].dtype == torch.int64, key
    assert batch["patch_noise"].shape == (4, (SIZE // PATCH) ** 2)
    assert batch["patch_noise"].dtype == torch.float32
    assert ((batch["patch_noise"] >= 0) & (batch["patch_noise"] < 1)).all()
    assert batch["cls"].dtype == torch.int64 and ((batch["cls"] >= 0) & (batch["cls"] < 32)).all()
    assert (batch["text"][:, 0] == SOS_ID).all()
    selected = batch["mlm_labels"] != -100
    assert selected.any(dim=1).all()
    assert torch.equal(batch["mlm_labels"][selected], batch["text"][selected])
    assert torch.equal(batch["mlm_input"][~selected], batch["text"][~selected])
    # normalised with CLIP mean/std: pixel values in [0,1] map to roughly [-1.8, 2.2]
    assert -2.0 < batch["image"].min() < batch["image"].max() < 2.3
    assert len(batch["_keys"]) == 4 and all(k.startswith("s0_") for k in batch["_keys"])
    assert (batch["_position"]["worker"], batch["_position"]["epoch"]) == (0, 0)
    assert batch["_position"]["offset"] >= 4 and batch["_position"]["delivered"] == 4
    assert batch["_skips"] == {} and batch["_epochs"] == [0] * 4


def test_ranks_and_workers_see_disjoint_samples_covering_the_epoch(shards, tiny_tok):
    per_rank = {}
    for rank in (0, 1):
        # 32 samples per rank per epoch = 8 batches of 4; a 9th batch starts epoch 1
        batches = _take(train_loader(_cfg(shards["urls"], workers=2), tiny_tok, rank=rank, world=2), 9)
        assert [b["_position"]["epoch"] for b in batches] == [0] * 8 + [1]
        assert [b["_position"]["worker"] for b in batches] == [0, 1] * 4 + [0]
        per_rank[rank] = batches[:8]
    keys = {rank: [k for b in bs for k in b["_keys"]] for rank, bs in per_rank.items()}
    assert len(keys[0]) == len(set(keys[0])) == 32 and len(set(keys[1])) == 32
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == {f"s0_{i:09d}" for i in range(64)}
    # per-sample randomness depends on (seed, epoch, key) only, not on which rank/worker read it
    single = _take(train_loader(_cfg(shards["urls"], workers=0), tiny_tok, rank=0, world=1), 16)
    assert all(b["_position"]["epoch"] == 0 for b in single)
    by_key = {k: (b, i) for b in single for i, k in enumerate(b["_keys"])}
    for batches in per_rank.values():
        for b in batches:
            for i, k in enumerate(b["_keys"]):
                ref, j = by_key[k]
                for name in MODEL_KEYS:
                    assert torch.equal(b[name][i], ref[name][j]), (k, name)


def test_missing_shards_and_too_few_samples_are_clear_errors(shards, tiny_tok, tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        train_loader(_cfg(shards["urls"].replace("shard-", "nope-")), tiny_tok, rank=0, world=1)
    # 3 samples cannot give each of 2 x 2 streams a sample; sizes.json makes this a start-up error
    tiny = write_synthetic_shards(tmp_path, samples=3, samples_per_shard=3, image_size=16, seed=0)
    with pytest.raises(ValueError, match="1 shard.* with 3 samples cannot feed 2 ranks x 2 workers"):
        train_loader(_cfg(tiny["urls"], workers=2), tiny_tok, rank=0, world=2)
    train_loader(_cfg(tiny["urls"], workers=1), tiny_tok, rank=0, world=2)  # 2 streams: fine


# ----------------------------------------------------------------------------------------- resume
def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["_keys"] == w["_keys"] and g["_position"] == w["_position"]
        for name in MODEL_KEYS:
            assert torch.equal(g[name], w[name]), name


def test_resume_continues_exactly(shards, tiny_tok):
    cfg = _cfg(shards["urls"], workers=2, buffer=10)
    # 16 batches per epoch on one rank: 19 batches cross into epoch 1
    loader = train_loader(cfg, tiny_tok, rank=0, world=1)
    reference = _take(loader, 19)
    tracker = loader.tracker
    for batch in reference[:5]:
        tracker.update(batch)
    saved = json.loads(json.dumps(tracker.state()))  # what a checkpoint stores
    assert saved["num_workers"] == 2 and saved["world"] == 1 and saved["batches"] == 5
    assert set(saved["workers"]) == {"0", "1"}

    resumed = train_loader(cfg, tiny_tok, rank=0, world=1, position=saved)
    first = list(islice(iter(resumed), 4))
    _assert_same_batches(first, reference[5:9])
    # resume again after one more batch (from worker 1): worker 0's place must come from the first save
    tracker2 = resumed.tracker
    tracker2.update(first[0])
    saved2 = tracker2.state()
    assert saved2["batches"] == 6 and saved2["workers"]["0"] == saved["workers"]["0"]
    again = _take(train_loader(cfg, tiny_tok, rank=0, world=1, position=saved2), 13)
    _assert_same_batches(again, reference[6:19])
    assert again[-1]["_position"]["epoch"] == 1


def test_unusable_positions_are_rejected_clearly(shards, tiny_tok):
    cfg = _cfg(shards["urls"], workers=2)
    saved = train_loader(cfg, tiny_tok, rank=0, world=1).tracker.state()
    # one rank's entry is enough for an unchanged layout, not for a re-deal
    with pytest.raises(ValueError, match="saved with 1 ranks x 2 workers.*2 ranks x 2 workers.*every rank"):
        train_loader(cfg, tiny_tok, rank=0, world=2, position=saved)
    with pytest.raises(ValueError, match="format version None.*older mmpt"):
        old = {"workers": {"0": {"epoch": 0, "offset": 4}}, "num_workers": 2, "world": 1, "batches": 1}
        train_loader(cfg, tiny_tok, rank=0, world=1, position=[old])
    fewer = _cfg(shards["files"][0] + "::" + shards["files"][1], workers=2)
    with pytest.raises(ValueError, match="covers 8 shards but data.train now expands to 2"):
        train_loader(fewer, tiny_tok, rank=0, world=1, position=[saved])


# -------------------------------------------------------------------------------- foreign / bad data
def test_plain_tar_shard_trains_the_same(tmp_path, tiny_tok):
    members = []
    for i in range(6):
        ext, fmt = ("png", "PNG") if i == 5 else ("jpg", "JPEG")
        members += [(f"img{i:04d}.{ext}", _jpeg((40 * i, 100, 200), fmt=fmt)),
                    (f"img{i:04d}.txt", f"a blue circle number {i}".encode()),
                    (f"img{i:04d}.cls", str(i + 10).encode())]
    path = tmp_path / "plain.tar"
    _write_tar(path, members)
    batches = _take(train_loader(_cfg(str(path), batch=3), tiny_tok, rank=0, world=1), 3)
    assert sorted(k for b in batches[:2] for k in b["_keys"]) == [f"img{i:04d}" for i in range(6)]
    for b in batches[:2]:
        assert b["image"].shape == (3, 3, SIZE, SIZE) and b["_skips"] == {}
        assert b["cls"].tolist() == [int(k[3:]) + 10 for k in b["_keys"]]
    assert batches[2]["_position"]["epoch"] == 1
    # pipe: URLs go through webdataset's gopen like local paths
    evals = list(make_eval_loader(f"pipe:cat {path}", tiny_tok, SIZE, 4, CTX, [0.5] * 3, [0.5] * 3))
    assert [k for b in evals for k in b["_keys"]] == [f"img{i:04d}" for i in range(6)]


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_tok):
    good = [(f"good{i}.{ext}", _jpeg() if ext == "jpg" else b"a red square")
            for i in range(4) for ext in ("jpg", "txt")]
    bad = [
        ("garbage.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"), ("garbage.txt", b"a caption"),
        ("truncjpg.jpg", _jpeg()[:60]), ("truncjpg.txt", b"a caption"),
        ("nocaption.jpg", _jpeg()),
        ("emptycap.jpg", _jpeg()), ("emptycap.txt", b"  \n "),
        ("noimage.txt", b"only a caption"),
        ("badutf8.jpg", _jpeg()), ("badutf8.txt", b"\xc3\x28 invalid"),
    ]
    path = tmp_path / "mixed.tar"
    _write_tar(path, bad + good)  # bad first: all are counted before the first batch is full
    (batch,) = _take(train_loader(_cfg(str(path), batch=4, buffer=0), tiny_tok, rank=0, world=1), 1)
    assert sorted(batch["_keys"]) == [f"good{i}" for i in range(4)]
    expected = {"bad_image": 2, "missing_caption": 1, "empty_caption": 1, "missing_image": 1, "bad_text": 1}
    assert batch["_skips"] == expected
    evals = list(make_eval_loader(str(path), tiny_tok, SIZE, 3, CTX, [0.5] * 3, [0.5] * 3))
    assert [k for b in evals for k in b["_keys"]] == [f"good{i}" for i in range(4)]
    assert evals[-1]["_skips"] == expected and evals[-1]["image"].shape == (1, 3, SIZE, SIZE)


def test_truncated_and_vanished_shards_are_counted_not_fatal(tmp_path, tiny_tok):
    summary = write_synthetic_shards(tmp_path, samples=32, samples_per_shard=8, image_size=24, seed=1)
    files = [Path(f) for f in summary["files"]]
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2 + 100])  # cut inside a member: the tar reader raises
    with tarfile.open(files[2]) as tar:
        cut = tar.getmembers()[8].offset  # cut on a header boundary: the tar reader stops silently
    files[2].write_bytes(files[2].read_bytes()[:cut])
    good = {f"s1_{i:09d}" for i in list(range(8)) + list(range(24, 32))}

    evals = list(make_eval_loader(summary["urls"], tiny_tok, SIZE, 5, CTX, [0.5] * 3, [0.5] * 3))
    keys = [k for b in evals for k in b["_keys"]]
    assert good <= set(keys) and len(keys) == len(set(keys)) < 32
    assert evals[-1]["_skips"].get("bad_shard") == 2

    loader = train_loader(_cfg(summary["urls"], batch=1, buffer=4), tiny_tok, rank=0, world=1)
    files[3].unlink()  # vanishes after start-up checks: counted when the worker reaches it
    epoch0, first_of_epoch1 = [], None
    for batch in loader:
        if batch["_position"]["epoch"] == 1:
            first_of_epoch1 = batch
            break
        epoch0.extend(batch["_keys"])
    assert good - {f"s1_{i:09d}" for i in range(24, 32)} <= set(epoch0)
    assert first_of_epoch1["_skips"]["bad_shard"] >= 3


def test_stream_without_any_usable_sample_fails_clearly(tmp_path, tiny_tok):
    path = tmp_path / "junk.tar"
    junk = [(f"k{i}.{ext}", b"not an image" if ext == "jpg" else b"a cap")
            for i in range(3) for ext in ("jpg", "txt")]
    _write_tar(path, [*junk, ("k9.txt", b"caption only")])
    # one shard: the same (bad) shard every epoch, so the stream gives up after 3 epochs, naming why
    expected = (r"no usable sample in epoch 2 .*'bad_image': 9, 'missing_image': 3.*3 epochs in a row.*same "
                r"shard\(s\)")
    with pytest.raises(DataQualityError, match=expected):
        _take(train_loader(_cfg(str(path)), tiny_tok, rank=0, world=1), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_after_the_last_batch_are_reported(tmp_path, tiny_tok, workers):
    """`_skips` is cumulative per stream, and eval callers (`pretrain embed`, the sharded embed store) report
    each stream's last batch's counts. Bad samples at the end of a stream's last shard, after a batch that
    was already full, came after that last batch and were logged but never counted."""
    urls = []
    for name in ("a", "b"):
        good = [(f"{name}{i}.{ext}", _jpeg() if ext == "jpg" else b"a red square")
                for i in range(4) for ext in ("jpg", "txt")]
        bad = [(f"{name}9.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), (f"{name}9.txt", b"a caption")]
        bad += [("zcaptionless.jpg", _jpeg())] if name == "b" else []
        _write_tar(tmp_path / f"{name}.tar", good + bad)
        urls.append(str(tmp_path / f"{name}.tar"))
    for batch_size in (2, 4):  # 4 good samples per shard: the last batch is full before the bad ones
        loader = make_eval_loader("::".join(urls), tiny_tok, SIZE, batch_size, CTX, [0.5] * 3, [0.5] * 3,
                                  workers=workers)
        last: dict[int, dict[str, int]] = {}
        keys = []
        for batch in loader:  # with 2 workers each reads one whole shard
            last[int(batch["_order"][0, 0]) % max(workers, 1)] = batch["_skips"]
            keys += batch["_keys"]
        total: dict[str, int] = {}
        for skips in last.values():
            for reason, n in skips.items():
                total[reason] = total.get(reason, 0) + n
        assert sorted(keys) == [f"{s}{i}" for s in "ab" for i in range(4)]
        assert total == {"bad_image": 2, "missing_caption": 1}, (batch_size, last)


def _good_and_all_bad_shards(tmp_path: Path) -> list[str]:
    """Shard 0 holds only bad samples (2 undecodable images, 1 image without caption), shard 1 4 good ones."""
    bad = [("x0.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("x0.txt", b"a caption"),
           ("x1.jpg", b"\x00" * 300), ("x1.txt", b"a caption"), ("x2.jpg", _jpeg())]
    good = [(f"g{i}.{ext}", _jpeg() if ext == "jpg" else b"a red square")
            for i in range(4) for ext in ("jpg", "txt")]
    _write_tar(tmp_path / "bad.tar", bad)
    _write_tar(tmp_path / "good.tar", good)
    return [str(tmp_path / "bad.tar"), str(tmp_path / "good.tar")]


def _summed_skips(batches) -> tuple[dict[str, int], list[str]]:
    """Run-wide skips as eval callers sum them: each stream's last batch (`_skips` is cumulative); a
    zero-row batch is its stream's only one, with a real batch's keys and trailing shapes."""
    last: dict[int, dict[str, int]] = {}
    total: dict[str, int] = {}
    keys: list[str] = []
    real = next(b for b in batches if b["_keys"])
    for batch in batches:
        keys += batch["_keys"]
        if not batch["_keys"]:
            assert batch.keys() == real.keys()
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    assert v.shape == (0, *real[k].shape[1:]) and v.dtype == real[k].dtype, k
            last[-1 - len(last)] = batch["_skips"]
        else:
            last[int(batch["_order"][0, 0])] = batch["_skips"]  # one stream per shard here
    for skips in last.values():
        for reason, n in skips.items():
            total[reason] = total.get(reason, 0) + n
    return total, keys


@pytest.mark.parametrize("layout", ["2 workers", "2 ranks", "2 workers, masked"])
def test_eval_stream_without_a_usable_sample_still_reports_its_skips(tmp_path, tiny_tok, layout):
    """A stream (a rank's DataLoader worker) whose whole share is bad yielded no batch, so its skips
    reached no consumer: the run reported 0 of them. With `empty_batches` it yields one zero-row batch
    carrying them."""
    urls = "::".join(_good_and_all_bad_shards(tmp_path))
    args = (urls, tiny_tok, SIZE, 2, CTX, [0.5] * 3, [0.5] * 3)
    masking = (3, 0.5, (SIZE // PATCH) ** 2) if "masked" in layout else None
    if layout.startswith("2 workers"):
        batches = list(make_eval_loader(*args, workers=2, empty_batches=True, masking=masking))
    else:  # rank 0 reads the bad shard, rank 1 the good one
        batches = [b for r in range(2) for b in make_eval_loader(*args, rank=r, world=2, empty_batches=True)]
    total, keys = _summed_skips(batches)
    assert sorted(keys) == [f"g{i}" for i in range(4)]
    assert total == {"bad_image": 2, "missing_caption": 1}
    # off by default: callers that do not sum skips never see a zero-row batch
    assert all(b["_keys"] for b in make_eval_loader(*args, workers=2))
