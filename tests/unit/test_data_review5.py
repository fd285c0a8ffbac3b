"""Review 5 (data): synth's OUT rule, the configured pixel limit over Pillow's, high-bit-depth images,
stalled http shards (a loopback server only)."""

import io
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import pretrain_cli

from data_pipelines import shardstream
from data_pipelines.decode import decode_image
from data_pipelines.importers import check_image
from data_pipelines.shardstream import shard_samples
from data_pipelines.stats import IMAGE_TOO_LARGE, SkipCounter
from data_pipelines.synth import write_synthetic_shards
from data_pipelines.transforms import center_crop_resize, center_crop_resize_array, to_uint8_array


def test_synth_refuses_a_non_empty_out_and_overwrite_replaces_only_its_files(tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "classnames.txt").write_text("cat\ndog\n")
    (out / "shard-000007.tar").write_bytes(b"old shard")  # a stale shard of the same prefix
    (out / "other-000000.tar").write_bytes(b"other prefix")
    (out / "sizes.json").write_text(json.dumps({"shard-000007.tar": 9, "other-000000.tar": 3}))
    args = ["data", "synth", str(out), "--samples", "4", "--samples-per-shard", "4", "--image-size", "16"]
    refused = pretrain_cli(*args)
    assert refused.returncode == 2, refused.stderr
    assert f"OUT {out} is not empty" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (out / "classnames.txt").read_text() == "cat\ndog\n"
    assert sorted(p.name for p in out.iterdir()) == ["classnames.txt", "other-000000.tar", "shard-000007.tar",
                                                     "sizes.json"]
    with pytest.raises(ValueError, match="is not empty"):  # the API's rule when asked (the CLI's default)
        write_synthetic_shards(out, samples=4, samples_per_shard=4, image_size=16, seed=0, overwrite=False)

    done = pretrain_cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "sizes.json").read_text()) == {"other-000000.tar": 3, "shard-000000.tar": 4}
    assert not (out / "shard-000007.tar").exists()
    assert (out / "other-000000.tar").read_bytes() == b"other prefix"
    assert (out / "classnames.txt").read_text().startswith("red circle")


def test_synth_into_a_new_or_empty_folder_needs_no_flag(tmp_path):
    write_synthetic_shards(tmp_path / "new" / "deep", samples=2, samples_per_shard=2, image_size=16, seed=0,
                           overwrite=False)
    (tmp_path / "empty").mkdir()
    write_synthetic_shards(tmp_path / "empty", samples=2, samples_per_shard=2, image_size=16, seed=0,
                           overwrite=False)
    assert Path(tmp_path / "empty" / "shard-000000.tar").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_synthetic_shards(tmp_path / "afile", samples=2, samples_per_shard=2, image_size=16, seed=0)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes, max_pixels: int, view=None):
    skips = SkipCounter(first_warnings=0)
    out = decode_image(data, "k", skips, view or (lambda i: center_crop_resize_array(i, 8)), max_pixels)
    return out, skips.as_dict()


def test_configured_pixel_limit_applies_not_pillows(monkeypatch):
    """Pillow refuses images over 2 x its MAX_IMAGE_PIXELS (lowered here, so a 100x100 PNG is a "bomb" to
    it); `max_image_pixels=0` (no limit) and limits above Pillow's must still decode, in training and
    import."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(Image.new("RGB", (100, 100), (10, 200, 30)))
    for limit in (0, 20_000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        out, skips = _decode(data, limit)
        assert skips == {} and out is not None and tuple(out[4, 4]) == (10, 200, 30), (limit, skips)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        assert check_image(data, "decode", limit)[2:] == (100, 100)
    out, skips = _decode(data, 5_000)  # ours, below the image: refused from the header
    assert out is None and skips == {IMAGE_TOO_LARGE: 1}
    with pytest.raises(Exception) as info:  # importers._Skip (private)
        check_image(data, "header", 5_000)
    assert info.value.reason == IMAGE_TOO_LARGE


def test_a_real_bomb_above_pillows_default_opens_with_no_limit(monkeypatch):
    """A 20000 x 9500 1-bit PNG (190M pixels > Pillow's 178,956,970; a few kB): header only, no decode."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    data = _png(Image.new("1", (20000, 9500)))
    assert len(data) < 100_000
    out, skips = _decode(data, 0, view=lambda img: img.size)
    assert skips == {} and out == (20000, 9500)
    out, skips = _decode(data, 89_478_485, view=lambda img: img.size)
    assert out is None and skips == {IMAGE_TOO_LARGE: 1}


@pytest.mark.parametrize("mode, value", [("I;16", 32768), ("I", 32768), ("F", 0.5)])
def test_high_bit_depth_grey_is_rescaled_not_clipped(mode, value):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(np.full((12, 20), value, dtype=dtype))
    assert img.mode == mode
    if mode == "I;16":  # the common case: a 16-bit grey PNG through the training decode
        out, skips = _decode(_png(img), 0)
        assert skips == {} and out.shape == (8, 8, 3) and abs(int(out.mean()) - 128) <= 1, out.mean()
    for fast in (True, False):  # both decode paths: numpy (training) and PIL (eval, classify)
        out = center_crop_resize_array(img, 8) if fast else np.asarray(center_crop_resize(img, 8))
        assert out.dtype == np.uint8 and abs(float(out.mean()) - 128) <= 1, (mode, fast, out.mean())
    assert abs(float(to_uint8_array(img).mean()) - 128) <= 1


def test_import_reencodes_float_tiff_to_mid_grey_png():
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32)).save(buf, format="TIFF")
    ext, data, width, height = check_image(buf.getvalue(), "header", 0)
    assert ext == "png" and (width, height) == (6, 6)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert abs(float(pixels.mean()) - 128) <= 1, pixels.mean()


@pytest.fixture
def silent_server():
    """A loopback TCP server that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(5)
    for c in conns:
        c.close()
    srv.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) shards with curl")
def test_a_stalled_http_shard_becomes_a_bad_shard_in_bounded_time(silent_server, monkeypatch):
    monkeypatch.setattr(shardstream, "HTTP_STALL_S", 1)
    monkeypatch.setattr(shardstream, "HTTP_RETRY_S", 0)
    skips = SkipCounter(first_warnings=0)
    result: dict = {}
    url = f"http://127.0.0.1:{silent_server}/shard-000000.tar"
    reader = threading.Thread(target=lambda: result.update(n=sum(1 for _ in shard_samples([url], skips))),
                              daemon=True)
    reader.start()
    reader.join(30)  # the stall limit is 1 s: 30 s only proves it ends (before the fix: never)
    assert not reader.is_alive(), "still blocked reading a shard from a server that sends nothing"
    assert result == {"n": 0} and skips.as_dict() == {"bad_shard": 1}


def test_a_file_url_names_the_file_webdataset_opens_percent_escapes_included(tmp_path):
    """Review 5 #6: `local_path` kept `%20` while webdataset's reader decodes it, so the start-up check and
    the reader named different files (a real `a b` folder refused at start-up; an `a%20b` folder passed it
    and every read was a bad_shard)."""
    from data_pipelines.urls import expand_urls, local_path

    spaced = tmp_path / "a b"
    write_synthetic_shards(spaced, samples=3, samples_per_shard=3, image_size=16, seed=0)
    url = f"file://{tmp_path}/a%20b/shard-000000.tar"
    assert local_path(url) == str(spaced / "shard-000000.tar")
    assert expand_urls(url) == [url]  # the start-up check finds it
    skips = SkipCounter(first_warnings=0)
    assert sum(1 for _ in shard_samples([url], skips)) == 3 and not skips.as_dict()
    literal = tmp_path / "c%20d"
    write_synthetic_shards(literal, samples=3, samples_per_shard=3, image_size=16, seed=0)
    with pytest.raises(ValueError, match="do not exist"):  # the reader would open `c d`: refused up front
        expand_urls(f"file://{tmp_path}/c%20d/shard-000000.tar")


def test_a_folder_import_reads_an_upper_case_caption_sidecar(tmp_path):
    """Review 5 #10: image suffixes were matched in any case, `.txt` only in lower case, so `A.jpg` +
    `A.TXT` was counted as missing_caption and `A.TXT` itself was neither read nor counted."""
    from data_pipelines.import_sources import folder_records

    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(src / "A.jpg")
    (src / "A.TXT").write_text("a red square\n")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(src / "B.JPG")
    (src / "B.txt").write_text("a blue square\n")
    (src / "C.Txt").write_text("no image here\n")
    skips = SkipCounter(first_warnings=0)
    records = list(folder_records(str(src), skips))
    assert [(key, caption is not None) for key, _, caption, _ in records] == [("A", True), ("B", True)]
    assert skips.as_dict() == {"missing_image": 1}  # C.Txt, counted as a caption without an image
