"""Synthetic shards: readable by tarfile and webdataset, complete metadata, byte-identical per seed."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.synth import CLASSNAMES, COLOURS, SHAPES, write_synthetic_shards


def _tar_files(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.tar"))


def test_shards_readable_by_tarfile_with_fixed_headers(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=10, samples_per_shard=4, image_size=32, seed=3)
    files = _tar_files(tmp_path)
    assert [p.name for p in files] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary["shards"] == 3 and summary["samples"] == 10 and summary["out_dir"] == str(tmp_path)
    assert summary["files"] == [str(p) for p in files]
    names = []
    for path in files:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isreg() and member.mtime == 946684800 and member.uid == 0
                names.append(member.name)
    keys = sorted({n.rsplit(".", 1)[0] for n in names})
    assert keys == [f"s3_{i:09d}" for i in range(10)]
    assert sorted(names) == sorted(f"{k}.{ext}" for k in keys for ext in ("cls", "jpg", "json", "txt"))


def test_shards_readable_by_webdataset_with_consistent_fields(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=24, samples_per_shard=8, image_size=40, seed=1)
    pipeline = wds.DataPipeline(wds.SimpleShardList(summary["files"]), wds.tarfile_to_samples())
    samples = list(pipeline)
    assert len(samples) == 24
    for s in samples:
        assert {"jpg", "txt", "json", "cls"} <= set(s)
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (40, 40)
        attrs = json.loads(s["json"])
        cls = int(s["cls"])
        assert attrs["class"] == cls and CLASSNAMES[cls] == attrs["classname"]
        assert CLASSNAMES[cls] == f"{attrs['colour']} {attrs['shape']}"
        caption = s["txt"].decode()
        assert attrs["colour"] in caption and attrs["shape"] in caption
        assert 0.35 <= attrs["size_fraction"] <= 0.70
        # the shape is clearly drawn in its colour: the centre of its box has that colour
        x0, y0, x1, y1 = attrs["bbox"]
        centre = np.asarray(img, dtype=np.float32)[int((y0 + y1) / 2) + 1, int((x0 + x1) / 2)]
        assert np.abs(centre - np.array(COLOURS[attrs["colour"]])).max() < 40, (s["__key__"], centre)


def test_classnames_and_sizes_files(tmp_path):
    write_synthetic_shards(tmp_path, samples=7, samples_per_shard=3, image_size=16, seed=0, prefix="part")
    classnames = (tmp_path / "classnames.txt").read_text().splitlines()
    assert classnames == CLASSNAMES and len(set(classnames)) == len(COLOURS) * len(SHAPES) == 32
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"part-000000.tar": 3, "part-000001.tar": 3, "part-000002.tar": 1}
    for name, n in sizes.items():
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getnames()) == 4 * n


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", samples=12, samples_per_shard=5, image_size=24, seed=7)
    b = write_synthetic_shards(tmp_path / "b", samples=12, samples_per_shard=5, image_size=24, seed=7)
    c = write_synthetic_shards(tmp_path / "c", samples=12, samples_per_shard=5, image_size=24, seed=8)
    for fa, fb, fc in zip(a["files"], b["files"], c["files"], strict=True):
        assert Path(fa).read_bytes() == Path(fb).read_bytes()
        assert Path(fa).read_bytes() != Path(fc).read_bytes()
    assert (tmp_path / "a" / "sizes.json").read_bytes() == (tmp_path / "b" / "sizes.json").read_bytes()


def test_classes_are_all_used_and_bad_arguments_rejected(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=400, samples_per_shard=400, image_size=8, seed=0)
    pipeline = wds.DataPipeline(wds.SimpleShardList(summary["files"]), wds.tarfile_to_samples())
    seen = {int(s["cls"]) for s in pipeline}
    assert seen == set(range(32))
    with pytest.raises(ValueError, match="samples"):
        write_synthetic_shards(tmp_path / "x", samples=0, samples_per_shard=4, image_size=16, seed=0)
