"""Promises of docs/data.md that had no test: `--check decode` catches a truncated JPEG that the header
check lets through; the output does not depend on `--workers`; a custom `--opener`'s result is held to
`--max-sample-bytes`, and the opener may raise `SampleTooLarge` itself; a shard cut inside a tar header
is reported as truncated (not as a corrupt header or an appended tar)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from datautil import good_members, image_bytes, write_tar
from PIL import Image

from data_pipelines.importers import ImportOptions, run_import
from data_pipelines.inspection import inspect_shard
from data_pipelines.openers import SampleTooLarge

LIMIT = 3000


def noisy_jpeg(seed: int, size: int = 64) -> bytes:
    """A JPEG whose scan data is most of the file (noise does not compress): cutting it keeps the header."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def opts(**kw) -> ImportOptions:
    return ImportOptions(progress=False, **kw)


# ------------------------------------------------------------------------------- --check decode
def test_check_decode_counts_a_truncated_jpeg_the_header_check_imports(tmp_path: Path):
    src = tmp_path / "photos"
    src.mkdir()
    whole = noisy_jpeg(0)
    (src / "good.jpg").write_bytes(noisy_jpeg(1))
    (src / "cut.jpg").write_bytes(whole[:len(whole) // 3])
    for stem in ("good", "cut"):
        (src / f"{stem}.txt").write_text(f"a {stem} photo")
    with Image.open(src / "cut.jpg") as img:  # the header is whole: only decoding finds the cut
        assert img.size == (64, 64)

    header = run_import("folder", str(src), tmp_path / "header", opts(workers=0))
    assert header["samples"] == 2 and header["skipped"] == {}
    decode = run_import("folder", str(src), tmp_path / "decode", opts(workers=0, check="decode"))
    assert decode["samples"] == 1 and decode["skipped"] == {"bad_image": 1}
    assert decode["skipped_examples"]["bad_image"][0].startswith("cut: ")


# ---------------------------------------------------------------------------- --workers 0 vs 2
def _photo_folder(src: Path, n: int) -> None:
    """n images over several loader chunks (32 records each), with skips and duplicates spread among them."""
    src.mkdir()
    for i in range(n):
        (src / f"img{i:03d}.jpg").write_bytes(image_bytes(colour=(i, 255 - i, (7 * i) % 256)))
        (src / f"img{i:03d}.txt").write_text(f"photo {i}" if i % 23 != 5 else "  ")  # some empty captions
        if i % 17 == 3:
            (src / f"img{i:03d}.png").write_bytes(image_bytes("PNG", colour=(i, 0, 0)))  # duplicate_image
        if i % 29 == 11:
            (src / f"img{i:03d}.jpg").write_bytes(b"\xff\xd8\xff not an image")  # bad_image


def _output(out: Path) -> tuple[dict[str, bytes], dict]:
    stats = json.loads((out / "stats.json").read_text())
    for key in ("out", "urls", "wall_s"):
        stats.pop(key)
    stats["options"].pop("workers")
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "stats.json"}
    return files, stats


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_output_does_not_depend_on_workers(tmp_path: Path, kind: str):
    _photo_folder(tmp_path / "photos", 100)
    src = str(tmp_path / "photos")
    if kind == "csv":
        rows = "".join(f"photos/img{i:03d}.jpg,photo {i}\n" for i in range(100) if i % 23 != 5)
        (tmp_path / "pairs.csv").write_text(f"path,caption\nphotos/img005.jpg,\n{rows}")
        src = str(tmp_path / "pairs.csv")
    results = {w: _output_of(kind, src, tmp_path / f"w{w}", w) for w in (0, 2)}
    files, stats = results[0]
    assert stats["samples"] > 3 * 32 // 2 and len(files) > 5  # several chunks and shards
    assert stats["skipped"]["bad_image"] and stats["skipped"]["empty_caption"]
    assert sorted(results[2][0]) == sorted(files)
    for name, data in files.items():
        assert results[2][0][name] == data, name  # byte for byte, shards and sizes.json
    assert results[2][1] == stats


def _output_of(kind: str, src: str, out: Path, workers: int) -> tuple[dict[str, bytes], dict]:
    run_import(kind, src, out, opts(workers=workers, samples_per_shard=7))
    return _output(out)


# ---------------------------------------------------------------------- --opener and the byte limit
def big_opener(ref: str) -> bytes:
    """An --opener (importable as f"{__name__}:big_opener"): too many bytes for huge.jpg, its own
    SampleTooLarge for raise.jpg, a small image otherwise."""
    if ref.endswith("raise.jpg"):
        raise SampleTooLarge(f"{ref}: too big (the opener says so)")
    small = image_bytes(colour=(1, 2, 3))
    assert len(small) < LIMIT
    return small + b"\0" * (2 * LIMIT) if ref.endswith("huge.jpg") else small


@pytest.mark.parametrize("workers", [0, 2])
def test_a_custom_opener_is_held_to_the_byte_limit(tmp_path: Path, workers: int):
    (tmp_path / "u.csv").write_text("url,text\ns3://b/ok.jpg,fits\ns3://b/huge.jpg,too many bytes\n"
                                    "s3://b/raise.jpg,refused by the opener\n")
    stats = run_import("csv", str(tmp_path / "u.csv"), tmp_path / "out",
                       opts(workers=workers, opener=f"{__name__}:big_opener", max_sample_bytes=LIMIT))
    assert stats["samples"] == 1 and stats["skipped"] == {"too_large": 2}
    examples = " | ".join(stats["skipped_examples"]["too_large"])
    assert f"s3://b/huge.jpg: {len(image_bytes(colour=(1, 2, 3))) + 2 * LIMIT} bytes > {LIMIT}" in examples
    assert "s3://b/raise.jpg: too big (the opener says so)" in examples
    # the same opener without a limit: every sample is imported
    stats = run_import("csv", str(tmp_path / "u.csv"), tmp_path / "nolimit",
                       opts(workers=workers, opener=f"{__name__}:big_opener", max_sample_bytes=0))
    assert stats["samples"] == 2 and stats["skipped"] == {"too_large": 1}  # raise.jpg: the opener's own


# ------------------------------------------------------------------------ a cut inside a tar header
def test_a_shard_cut_inside_a_tar_header_is_reported_as_truncated(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_tar(path, good_members("k", 4))
    with tarfile.open(path) as tar:
        header = next(m for m in tar.getmembers() if m.name == "k002.jpg").offset
    whole = path.read_bytes()
    path.write_bytes(whole[:header + 32])  # 32 bytes of k002.jpg's header, then the end
    report = inspect_shard(str(path))
    assert report["samples"] == report["good"] == 2 and report["bad"] == {"bad_shard": 1}
    example = report["examples"]["bad_shard"][0]
    assert "truncated inside a tar header" in example and f"header at byte {header}" in example, example
    assert "appended" not in example and "corrupt header" not in example
    # a whole header of garbage there is still the other case: data after where the reader stopped
    path.write_bytes(whole[:header] + b"\x07" * 512 + whole[header + 512:])
    report = inspect_shard(str(path))
    assert report["bad"] == {"bad_shard": 1} and "data follows" in report["examples"]["bad_shard"][0]
