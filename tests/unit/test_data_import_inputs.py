"""What `data import` does with awkward input: malformed CSV rows are counted (file:line) and cost only
themselves, never merged into a caption or fatal; dropped inputs (a second image of the same name, a
second image member) are counted or kept; every skip reason gets examples; camera JPEGs (Pillow's "MPO")
are copied unchanged."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from datautil import good_members, image_bytes, opts, read_back, write_tar
from PIL import Image

from data_pipelines.importers import check_image, run_import


def captions(out: Path) -> dict[str, str]:
    return {k: s["txt"].decode() for k, s in read_back(out).items()}


@pytest.fixture()
def imgs(tmp_path: Path) -> Path:
    (tmp_path / "i.jpg").write_bytes(image_bytes())
    return tmp_path


def test_an_unbalanced_quote_costs_one_row_not_the_rest_of_the_file(imgs):
    """`1.jpg,"12 inch monitor` used to swallow every later row into one caption, without a count."""
    rows = [f"i.jpg,row {i}" for i in range(60)]
    rows[11] = 'i.jpg,"12 inch monitor'  # line 13 (header is line 1)
    rows[30] = 'i.jpg,"a quoted, fine caption"'
    rows[40] = 'i.jpg,"a caption over\ntwo lines"'  # valid CSV: kept whole
    (imgs / "q.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    stats = run_import("csv", str(imgs / "q.csv"), imgs / "out", opts())
    assert stats["skipped"] == {"bad_text": 1} and stats["samples"] == 59
    example = stats["skipped_examples"]["bad_text"][0]
    assert example.startswith(f"{imgs / 'q.csv'}:13: a quoted field runs to line 32, where the CSV breaks")
    got = captions(imgs / "out")
    assert got["000000012"] == "row 12" and got["000000059"] == "row 59" and "000000011" not in got
    assert got["000000030"] == "a quoted, fine caption" and got["000000040"] == "a caption over\ntwo lines"

    # a stray quote that happens to close cleanly later (a caption ending in 27") still costs one row
    rows = [f"i.jpg,row {i}" for i in range(10)]
    rows[2], rows[6] = 'i.jpg,"27 inch monitor', 'i.jpg,monitor 27"'
    (imgs / "q2.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    stats = run_import("csv", str(imgs / "q2.csv"), imgs / "out2", opts())
    assert stats["skipped"] == {"bad_text": 1} and stats["samples"] == 9
    assert "q2.csv:4: a quoted field runs over lines 5-8" in stats["skipped_examples"]["bad_text"][0]
    assert captions(imgs / "out2")["000000006"] == 'monitor 27"'


def test_huge_fields_non_utf8_and_extra_fields_are_counted_with_their_line(imgs):
    big = "x" * 200_000
    lines = [b"image,caption", b"i.jpg,ok 0", b'i.jpg,"' + big.encode() + b'"', b"i.jpg,caf\xe9 latin-1",
             b"i.jpg,a cat, sleeping", b"i.jpg,trailing delimiter is fine,", b"i.jpg,ok 6", b"i.jpg"]
    (imgs / "bad.csv").write_bytes(b"\n".join(lines) + b"\n")
    stats = run_import("csv", str(imgs / "bad.csv"), imgs / "out", opts())
    assert stats["skipped"] == {"bad_text": 3, "missing_caption": 1} and stats["samples"] == 3
    examples = stats["skipped_examples"]["bad_text"]
    assert [e.split(": ", 1)[0] for e in examples] == [f"{imgs / 'bad.csv'}:{n}" for n in (3, 4, 5)]
    assert "field larger than field limit" in examples[0] and "0xe9" in examples[1]
    assert "3 fields, the header has 2" in examples[2]
    assert captions(imgs / "out") == {"000000000": "ok 0", "000000004": "trailing delimiter is fine",
                                      "000000005": "ok 6"}
    (imgs / "head.csv").write_text('image,"caption\ni.jpg,x\n')
    with pytest.raises(ValueError, match=r"head.csv:1: cannot read the header row: a quote opened on"):
        run_import("csv", str(imgs / "head.csv"), imgs / "out2", opts())


def test_a_second_image_is_counted_or_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "IMG_1.jpg").write_bytes(image_bytes(colour=(255, 0, 0)))
    (src / "IMG_1.png").write_bytes(image_bytes("PNG", colour=(0, 0, 255)))  # e.g. an edited export
    (src / "IMG_1.txt").write_text("a red square")
    (src / "orphan.txt").write_text("no image")
    stats = run_import("folder", str(src), tmp_path / "out", opts())
    assert stats["skipped"] == {"duplicate_image": 1, "missing_image": 1} and stats["samples"] == 1
    assert "IMG_1.png: same name as IMG_1.jpg" in stats["skipped_examples"]["duplicate_image"][0]
    assert stats["skipped_examples"]["missing_image"] == [f"{src / 'orphan'}.txt has no image"]
    assert read_back(tmp_path / "out")["IMG_1"]["jpg"] == (src / "IMG_1.jpg").read_bytes()

    png, jpg = image_bytes("PNG"), image_bytes()
    write_tar(tmp_path / "in.tar", [("k1.jpg", jpg), ("k1.png", png), ("k1.txt", b"cap"), ("k1.cls", b"3"),
                                    ("k2.jpg", png), ("k2.png", jpg), ("k2.txt", b"png bytes in .jpg")])
    stats = run_import("wds", str(tmp_path / "in.tar"), tmp_path / "wds", opts())
    got = read_back(tmp_path / "wds")
    assert got["k1"]["jpg"] == jpg and got["k1"]["png"] == png and got["k1"]["cls"] == b"3"  # all kept
    # k2's image is written as .png (its real format): its own .png member would hide it from training
    assert got["k2"]["png"] == png and "jpg" not in got["k2"]
    assert stats["skipped"] == {"duplicate_image": 1}
    assert stats["skipped_examples"]["duplicate_image"][0].startswith("k2: member(s) png left out")


def test_reasons_counted_outside_the_workers_have_examples(tmp_path):
    write_tar(tmp_path / "a.tar", good_members("a", 3) + [("big.jpg", b"\0" * 20_000), ("big.txt", b"x")])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2 + 7])
    stats = run_import("wds", f"{tmp_path}/{{a,b}}.tar", tmp_path / "out", opts(max_sample_bytes=10_000))
    assert stats["skipped"]["too_large"] >= 1 and stats["skipped"]["bad_shard"] == 1
    assert set(stats["skipped_examples"]) >= {"too_large", "bad_shard"}
    assert stats["skipped_examples"]["too_large"][0].startswith("big: ")
    assert "b.tar" in stats["skipped_examples"]["bad_shard"][0]


def test_camera_jpegs_reported_as_mpo_are_copied_unchanged(tmp_path):
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    buf = io.BytesIO()
    pixels.save(buf, "MPO", save_all=True, append_images=[pixels.resize((40, 30))], quality=85)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert check_image(data, "header", 0) == ("jpg", data, 160, 120)
    (tmp_path / "cam.jpg").write_bytes(data)
    (tmp_path / "cam.txt").write_text("a camera photo")
    run_import("folder", str(tmp_path), tmp_path / "out", opts())
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.extractfile("cam.jpg").read() == data


def test_skipped_total_counts_only_inputs_left_out(tmp_path, caplog):
    """stats.json's `skipped_total` used to add the problems counted on samples that were imported anyway
    (a second image of the same name, a repeated key) to the inputs actually left out; those have a total of
    their own, `counted_kept_total`, and the per-reason counts stay as they were."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        (src / f"{name}.jpg").write_bytes(image_bytes())
        (src / f"{name}.txt").write_text(f"caption {name}")
    (src / "a.png").write_bytes(image_bytes("PNG"))  # counted as duplicate_image, sample `a` imported
    (src / "orphan.txt").write_text("no image")  # left out: missing_image
    stats = run_import("folder", str(src), tmp_path / "out", opts())
    assert stats["samples"] == 2 and stats["skipped"] == {"duplicate_image": 1, "missing_image": 1}
    assert stats["skipped_total"] == 1 and stats["counted_kept_total"] == 1
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["skipped_total"] == 1
    assert "counted, sample kept (duplicate_image)" in caplog.text

    jpg, png = image_bytes(), image_bytes("PNG")
    write_tar(tmp_path / "in.tar", [("k.jpg", png), ("k.png", jpg), ("k.txt", b"cap"),  # png member dropped
                                    ("d.jpg", jpg), ("d.txt", b"one"), ("d.jpg", jpg), ("d.txt", b"two")])
    stats = run_import("wds", str(tmp_path / "in.tar"), tmp_path / "wds", opts())
    assert stats["samples"] == 3 and stats["renamed_duplicate_keys"] == 1
    assert stats["skipped"] == {"duplicate_image": 1, "duplicate_key": 1}
    assert stats["skipped_total"] == 0 and stats["counted_kept_total"] == 2
