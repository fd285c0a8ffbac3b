"""Review 7 (data): the EXIF orientation is applied wherever an image is decoded (training's random crop,
eval's centre crop, the importer's sizes and re-encode), as `ImageOps.exif_transpose` shows the picture;
`data import --labels` keeps classifier data (image + `.cls`, no caption); a CSV's `file://` image refs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from datautil import opts, read_back, write_tar
from PIL import Image, ImageOps
from tiny import cli_json

from data_pipelines.decode import TRANSPOSES, decode_image, exif_orientation
from data_pipelines.importers import check_image, run_import
from data_pipelines.loader import make_eval_loader
from data_pipelines.stats import SkipCounter
from data_pipelines.transforms import (
    center_crop_resize,
    center_crop_resize_array,
    random_resized_crop,
    random_resized_crop_array,
    stored_box,
)

QUADRANTS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}
ORIENTATIONS = range(1, 9)


def stored_picture(size: tuple[int, int] = (160, 80)) -> Image.Image:
    """A landscape picture in four coloured quadrants (top-left red, top-right green, bottom-left blue,
    bottom-right yellow), as a camera stores it."""
    w, h = size
    img = Image.new("RGB", size, QUADRANTS["red"])
    img.paste(QUADRANTS["green"], (w // 2, 0, w, h // 2))
    img.paste(QUADRANTS["blue"], (0, h // 2, w // 2, h))
    img.paste(QUADRANTS["yellow"], (w // 2, h // 2, w, h))
    return img


def encoded(img: Image.Image, fmt: str, orientation: int) -> bytes:
    """`img` encoded as `fmt` with an EXIF orientation tag (Pillow writes JPEG APP1, PNG eXIf, WebP EXIF)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    img.save(buf, fmt, exif=exif.tobytes(), **extra)
    return buf.getvalue()


def colour_name(pixel) -> str:
    return min(QUADRANTS, key=lambda n: sum((int(a) - b) ** 2 for a, b in zip(pixel, QUADRANTS[n])))


def corners(arr: np.ndarray) -> list[str]:
    """Colour names at the corners (a pixel in), top-left, top-right, bottom-left, bottom-right."""
    b, r = arr.shape[0] - 2, arr.shape[1] - 2
    return [colour_name(arr[y, x]) for y, x in ((1, 1), (1, r), (b, 1), (b, r))]


def displayed(data: bytes) -> Image.Image:
    """The picture as viewers (and torchvision/open_clip users with exif_transpose) show it."""
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img)


def lossless(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_a_phone_jpeg_is_seen_as_displayed_in_training_and_eval_crops(orientation):
    """The reviewer's case (orientation 6: portrait, trained sideways) and every other: colours at the
    corners of the centre crop and of a whole-image random crop are those of the displayed picture, also
    through the reduced (draft) JPEG decode a small output uses (80 px -> 16: 1/4 scale)."""
    data = encoded(stored_picture(), "JPEG", orientation)
    shown = np.asarray(displayed(data))
    skips = SkipCounter()
    view = decode_image(data, "k", skips, lambda im: center_crop_resize_array(im, 16))
    height, width = shown.shape[:2]
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    assert corners(view) == corners(shown[top:top + side, left:left + side])
    with Image.open(io.BytesIO(data)) as img:
        assert corners(np.asarray(center_crop_resize(img, 16))) == corners(view)
    # scale 1 and the displayed aspect: the random crop is the whole displayed picture
    ratio = (width / height,) * 2
    whole = decode_image(data, "k", skips, lambda im: random_resized_crop_array(
        im, 16, (1.0, 1.0), ratio, rng=np.random.default_rng(0)))
    assert corners(whole) == corners(shown)
    with Image.open(io.BytesIO(data)) as img:
        pil = random_resized_crop(img, 16, (1.0, 1.0), ratio, rng=np.random.default_rng(0))
        assert corners(np.asarray(pil)) == corners(shown)
    assert skips.as_dict() == {}


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_random_crops_of_an_oriented_image_are_those_of_the_upright_image(fmt, orientation):
    """Same RNG draws, same pixels: the crop box is drawn on the displayed size (a portrait's aspect
    clamp, not the stored landscape's) and the crop turned upright exactly (lossless formats)."""
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (53, 91, 3), dtype=np.uint8))
    data = encoded(stored, fmt, orientation)
    upright = lossless(displayed(data))
    for seed in range(6):
        for scale in ((0.08, 1.0), (1.0, 1.0)):
            with Image.open(io.BytesIO(data)) as img:
                assert exif_orientation(img) == orientation
                got = random_resized_crop_array(img, 24, scale, rng=np.random.default_rng(seed))
            with Image.open(io.BytesIO(upright)) as img:
                want = random_resized_crop_array(img, 24, scale, rng=np.random.default_rng(seed))
            assert np.array_equal(got, want), (seed, scale)
    with Image.open(io.BytesIO(data)) as img:
        got = center_crop_resize_array(img, 24)
    with Image.open(io.BytesIO(upright)) as img:
        assert np.array_equal(got, center_crop_resize_array(img, 24))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_stored_box_crops_the_pixels_of_the_displayed_box(orientation):
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (7, 11, 3), dtype=np.uint8))
    shown = displayed(encoded(stored, "PNG", orientation))
    width, height = shown.size
    for x0 in range(width):
        for y0 in range(0, height, 2):
            for x1, y1 in ((x0 + 1, y0 + 1), (width, height), (min(x0 + 3, width), height)):
                box = (x0, y0, x1, y1)
                region = stored.crop(stored_box(box, orientation, stored.size))
                if orientation > 1:
                    region = region.transpose(TRANSPOSES[orientation])
                assert np.array_equal(np.asarray(region), np.asarray(shown.crop(box))), box


def test_no_or_a_broken_orientation_leaves_the_pixels_as_stored():
    plain = io.BytesIO()
    stored_picture().save(plain, "JPEG")
    with Image.open(plain) as img:
        assert exif_orientation(img) == 1
    for value in (0, 9, 300):
        with Image.open(io.BytesIO(encoded(stored_picture(), "JPEG", value))) as img:
            assert exif_orientation(img) == 1
            assert corners(center_crop_resize_array(img, 16)) == ["red", "green", "blue", "yellow"]


def test_the_importer_reports_the_displayed_size_and_re_encodes_upright():
    data = encoded(stored_picture(), "JPEG", 6)
    ext, kept, width, height = check_image(data, "header", 0)
    assert (ext, kept, width, height) == ("jpg", data, 80, 160)  # bytes unchanged: training turns them
    tiff = io.BytesIO()
    stored_picture().save(tiff, "TIFF", tiffinfo={0x0112: 8})
    ext, png, width, height = check_image(tiff.getvalue(), "header", 0)
    assert (ext, width, height) == ("png", 80, 160)
    with Image.open(io.BytesIO(png)) as img:  # no EXIF in the PNG: its pixels must be the displayed ones
        assert exif_orientation(img) == 1 and img.size == (80, 160)
        assert corners(np.asarray(img.convert("RGB"))) == corners(np.asarray(displayed(tiff.getvalue())))


# ------------------------------------------------------------------------------- --labels (classifier data)
def jpeg(orientation: int = 1) -> bytes:
    return encoded(stored_picture(), "JPEG", orientation)


def test_wds_import_of_classifier_shards_needs_labels_and_keeps_them(tmp_path):
    """The reviewer's case: KEY.jpg + KEY.cls, no caption, was 'produced no samples (missing_caption)'."""
    src = tmp_path / "in-000000.tar"
    classifier = [m for i in range(4) for m in ((f"c{i}.jpg", jpeg()), (f"c{i}.cls", str(i).encode()))]
    write_tar(src.with_name("cls-only.tar"), classifier)
    write_tar(src, classifier
              + [("t.jpg", jpeg()), ("t.txt", b"a caption"),  # a CLIP sample: still fine
                 ("n.jpg", jpeg()),  # neither caption nor label
                 ("b.jpg", jpeg()), ("b.cls", b"cat")])  # a label a classifier cannot read, no caption
    with pytest.raises(ValueError, match=r"missing_caption.*needs --labels") as refused:
        run_import("wds", str(src.with_name("cls-only.tar")), tmp_path / "plain", opts())
    assert "no samples" in str(refused.value)
    stats = run_import("wds", str(src), tmp_path / "out", opts(labels=True))
    assert stats["samples"] == 5
    assert stats["skipped"] == {"missing_label": 1, "bad_label": 1}
    back = read_back(tmp_path / "out")
    labels = {k: s["cls"].decode() for k, s in back.items() if "cls" in s}
    assert labels == {f"c{i}": str(i) for i in range(4)}
    assert "txt" not in back["c0"] and back["t"]["txt"] == b"a caption"
    assert json.loads(back["c0"]["json"]) == {"width": 160, "height": 80}


def test_wds_import_without_labels_counts_what_it_did_before(tmp_path):
    src = tmp_path / "in-000000.tar"
    write_tar(src, [("c.jpg", jpeg()), ("c.cls", b"3"), ("t.jpg", jpeg()), ("t.txt", b"a caption")])
    stats = run_import("wds", str(src), tmp_path / "out", opts())
    assert stats["samples"] == 1 and stats["skipped"] == {"missing_caption": 1}


def test_folder_import_with_labels_then_a_classifier_reads_it_upright(tmp_path, tiny_tok):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(6))  # a phone photo: portrait as displayed
    (photos / "a.cls").write_text("2\n")
    (photos / "b.jpg").write_bytes(jpeg())
    (photos / "b.CLS").write_text("0")  # sidecars in any case, as captions
    (photos / "c.jpg").write_bytes(jpeg())  # neither caption nor label
    (photos / "d.cls").write_text("1")  # a label without an image
    (photos / "e.jpg").write_bytes(jpeg())
    (photos / "e.txt").write_text("a captioned photo")
    stats = run_import("folder", str(photos), tmp_path / "out", opts(labels=True))
    assert stats["samples"] == 3
    assert stats["skipped"] == {"missing_label": 1, "missing_image": 1}
    assert any("d.cls has no image" in e for e in stats["skipped_examples"]["missing_image"])
    assert json.loads(read_back(tmp_path / "out")["a"]["json"])["width"] == 80  # displayed size
    (batch,) = make_eval_loader(stats["urls"], tiny_tok, 16, 8, 16, (0.0,) * 3, (1.0,) * 3, captions=False,
                                labels=True)
    labels = dict(zip(batch["_keys"], batch["cls"].tolist()))
    assert labels == {"a": 2, "b": 0}
    assert batch["_skips"] == {"missing_label": 1}  # e: a CLIP sample, kept by the import for its caption
    image = batch["image"][batch["_keys"].index("a")].permute(1, 2, 0).numpy() * 255.0
    shown = np.asarray(displayed(jpeg(6)))
    assert corners(image) == corners(shown[40:120])  # eval's centre crop, as displayed

    plain = run_import("folder", str(photos), tmp_path / "plain", opts())  # without --labels: as before
    assert plain["samples"] == 1 and plain["skipped"] == {"missing_caption": 3}


def test_labels_is_refused_for_tables_and_offered_by_the_cli(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\na.jpg,x\n")
    with pytest.raises(ValueError, match="--labels imports image [+] .cls samples: --from folder and --from"):
        run_import("csv", str(tmp_path / "t.csv"), tmp_path / "out", opts(labels=True))
    src = tmp_path / "in-000000.tar"
    write_tar(src, [("c.jpg", jpeg()), ("c.cls", b"3")])
    out = cli_json("data", "import", "--from", "wds", str(src), str(tmp_path / "cli"), "--labels",
                   "--workers", "0", "--no-progress")
    assert out["samples"] == 1
    assert json.loads((tmp_path / "cli" / "stats.json").read_text())["options"]["labels"] is True


# ------------------------------------------------------------------------------------ CSV file:// refs
def test_csv_file_urls_are_read_as_local_files(tmp_path):
    imgs = tmp_path / "im gs"
    imgs.mkdir()
    (imgs / "a b.jpg").write_bytes(jpeg())
    (imgs / "c:d.jpg").write_bytes(jpeg())
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n"
                     f"{(imgs / 'a b.jpg').as_uri()},escaped space\n"
                     f"file://{imgs / 'c:d.jpg'},a colon\n"
                     f"file://{imgs / 'missing.jpg'},gone\n")
    stats = run_import("csv", str(table), tmp_path / "out", opts())
    assert stats["samples"] == 2
    assert stats["skipped"] == {"missing_image": 1}
    back = read_back(tmp_path / "out")
    assert sorted(s["txt"].decode() for s in back.values()) == ["a colon", "escaped space"]
    assert json.loads(back["000000000"]["json"])["source"] == (imgs / "a b.jpg").as_uri()


# ------------------------------------------------------------------------------- data inspect --labels
def test_inspect_labels_counts_image_and_cls_samples_as_a_classifier_reads_them(tmp_path):
    """`data inspect` of classifier shards (image + .cls, no caption) predicted missing_caption for every
    sample; `--labels` checks as train.task=classify reads: good samples, missing/bad labels counted."""
    from data_pipelines.inspection import format_report, inspect_shard, inspect_shards

    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpg, format="JPEG")
    members = [("a.jpg", jpg.getvalue()), ("a.cls", b"3"), ("b.jpg", jpg.getvalue()), ("b.cls", b"x"),
               ("c.jpg", jpg.getvalue()), ("d.jpg", jpg.getvalue()), ("d.cls", b"0")]
    shard = tmp_path / "cls.tar"
    write_tar(shard, members)
    plain = inspect_shard(str(shard))
    assert plain["good"] == 0 and plain["bad"].get("missing_caption") == 4
    report = inspect_shards(str(shard), labels=True)
    assert (report["samples"], report["good"]) == (4, 2)
    assert report["bad"] == {"bad_label": 1, "missing_label": 1}
    assert "as a classifier reads them" in format_report(report)
    out = cli_json("data", "inspect", str(shard), "--json", "--labels")
    assert out["good"] == 2 and out["labels"] is True
