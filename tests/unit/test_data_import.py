"""Importers round-trip (folder / CSV / Parquet / WebDataset -> shards -> same captions and image bytes),
shards readable by plain webdataset and `tar`, sizes.json + stats.json with skips by reason; `data inspect`
and `bench data` through the CLI."""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from datautil import EXPECTED_SKIPS, image_bytes, write_corrupt_shards, write_tar
from PIL import Image
from tiny import pretrain_cli

from data_pipelines.importers import ImportOptions, resolve_opener, run_import, safe_key
from data_pipelines.inspection import format_report, inspect_shards
from data_pipelines.synth import write_synthetic_shards

MEMORY = {"mem://red": image_bytes(colour=(255, 0, 0)), "mem://png": image_bytes("PNG", colour=(0, 0, 255))}


def mem_opener(ref: str) -> bytes:
    """A pluggable opener (what an S3 or HTTP client would be), importable as f"{__name__}:mem_opener"."""
    if ref not in MEMORY:
        raise ConnectionError(f"no such object {ref}")
    return MEMORY[ref]


def read_back(out: Path) -> dict[str, dict]:
    """Every sample of OUT's shards as plain webdataset sees it (key -> {ext: bytes})."""
    stats = json.loads((out / "stats.json").read_text())
    urls = [str(out / s["name"]) for s in stats["shards"]]
    return read_back_synth(urls)


def check_layout(out: Path, per_shard: int) -> dict:
    """sizes.json and stats.json agree with the tars; every shard lists with the `tar` tool."""
    stats = json.loads((out / "stats.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {s["name"]: s["samples"] for s in stats["shards"]}
    for shard in stats["shards"]:
        path = out / shard["name"]
        assert path.stat().st_size == shard["bytes"] and shard["samples"] <= per_shard
        listed = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True)
        assert len({n.split(".", 1)[0] for n in listed.stdout.split()}) == shard["samples"]
    assert stats["samples"] == sum(sizes.values())
    assert not list(out.glob(".*.tmp"))
    return stats


def test_folder_round_trip(tmp_path):
    src = tmp_path / "photos"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    files = {
        "cats/a.jpg": image_bytes(colour=(10, 20, 30)), "cats/b.png": image_bytes("PNG"),
        "dogs/my.photo 1.jpeg": image_bytes(colour=(1, 2, 3)), "dogs/c.webp": image_bytes("WEBP"),
        "dogs/d.gif": image_bytes("GIF"),
    }
    captions = {"cats/a": "a cat", "cats/b": "  another cat\n", "dogs/my.photo 1": "a dog ü",
                "dogs/c": "a dog", "dogs/d": "a gif dog"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    for stem, text in captions.items():
        (src / f"{stem}.txt").write_text(text, encoding="utf-8")
    (src / "cats/a.json").write_text('{"license": "cc0"}')
    (src / "cats/nocap.jpg").write_bytes(image_bytes())
    (src / "cats/empty.jpg").write_bytes(image_bytes())
    (src / "cats/empty.txt").write_text("   ")
    (src / "dogs/orphan.txt").write_text("no image")
    (src / "dogs/broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (src / "dogs/broken.txt").write_text("broken")
    out = tmp_path / "out"
    stats = run_import("folder", str(src), out, ImportOptions(samples_per_shard=2, workers=2, progress=False))
    check_layout(out, 2)
    assert stats["skipped"] == {"missing_caption": 1, "empty_caption": 1, "missing_image": 1, "bad_image": 1}
    assert stats["samples"] == 5 and len(stats["shards"]) == 3
    samples = read_back(out)
    assert sorted(samples) == ["cats/a", "cats/b", "dogs/c", "dogs/d", "dogs/my_photo_1"]
    for key, sample in samples.items():
        meta = json.loads(sample["json"]) if key != "cats/a" else {"source": str(src / "cats/a.jpg")}
        name = str(Path(meta["source"]).relative_to(src))
        stem = name.rsplit(".", 1)[0]
        assert sample["txt"].decode() == captions[stem].strip()
        if name.endswith(".gif"):
            assert Image.open(io.BytesIO(sample["png"])).size == (40, 30)  # re-encoded once as PNG
        else:
            ext = {"jpeg": "jpg"}.get(name.rsplit(".", 1)[1], name.rsplit(".", 1)[1])
            assert sample[ext] == files[name], key  # bytes copied unchanged
    assert json.loads(samples["cats/a"]["json"]) == {"license": "cc0"}  # sidecar kept as a member


def test_csv_round_trip_with_urls_and_a_pluggable_opener(tmp_path):
    (tmp_path / "imgs").mkdir()
    local = image_bytes(colour=(5, 6, 7))
    (tmp_path / "imgs" / "x.jpg").write_bytes(local)
    served = image_bytes("PNG", colour=(9, 9, 9))
    (tmp_path / "imgs" / "served.png").write_bytes(served)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path / "imgs")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    rows = [("imgs/x.jpg", "local, relative"), (f"http://127.0.0.1:{port}/served.png", "over http"),
            (f"http://127.0.0.1:{port}/gone.png", "404"), ("imgs/missing.jpg", "no file"),
            ("imgs/x.jpg", ""), ("", "no image at all")]
    with open(tmp_path / "pairs.tsv", "w", encoding="utf-8") as fh:
        fh.write("id\tfilepath\tcaption\n")
        fh.writelines(f"r{i}\t{path}\t{cap}\n" for i, (path, cap) in enumerate(rows))
    out = tmp_path / "out"
    try:
        stats = run_import("csv", str(tmp_path / "pairs.tsv"), out,
                           ImportOptions(samples_per_shard=10, workers=2, key_col="id", progress=False))
    finally:
        server.shutdown()
    check_layout(out, 10)
    assert stats["skipped"] == {"fetch_failed": 1, "missing_image": 2, "empty_caption": 1}
    assert "gone.png" in stats["skipped_examples"]["fetch_failed"][0]
    samples = read_back(out)
    assert samples["r0"]["jpg"] == local and samples["r0"]["txt"] == b"local, relative"
    assert samples["r1"]["png"] == served and samples["r1"]["txt"] == b"over http"

    (tmp_path / "mem.csv").write_text("url,text\nmem://red,red\nmem://png,blue\nmem://nope,gone\n")
    stats = run_import("csv", str(tmp_path / "mem.csv"), tmp_path / "mem",
                       ImportOptions(workers=2, opener=f"{__name__}:mem_opener", progress=False))
    samples = read_back(tmp_path / "mem")
    assert samples["000000000"]["jpg"] == MEMORY["mem://red"]
    assert samples["000000001"]["png"] == MEMORY["mem://png"]
    assert stats["skipped"] == {"fetch_failed": 1}
    with pytest.raises(ValueError, match="module:function"):
        resolve_opener("nocolon")
    with pytest.raises(ValueError, match="cannot tell which column holds the caption"):
        (tmp_path / "odd.csv").write_text("image,foo\na.jpg,b\n")
        run_import("csv", str(tmp_path / "odd.csv"), tmp_path / "odd", ImportOptions(progress=False))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_parquet_round_trip_bytes_structs_and_paths(tmp_path):
    images = [image_bytes(colour=(i * 20, 0, 0)) for i in range(6)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": images[:4], "caption": [f"cap {i}" for i in range(3)] + [None]}),
                   tmp_path / "pq" / "part-0.parquet", row_group_size=2)
    (tmp_path / "pq" / "side.jpg").write_bytes(images[5])
    struct = pa.array([{"bytes": images[4], "path": None}, {"bytes": None, "path": "side.jpg"}],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "caption": ["cap 4", "cap 5"]}),
                   tmp_path / "pq" / "part-1.parquet")
    out = tmp_path / "out"
    stats = run_import("parquet", str(tmp_path / "pq"), out,
                       ImportOptions(samples_per_shard=2, workers=2, progress=False))
    check_layout(out, 2)
    assert stats["skipped"] == {"missing_caption": 1}
    samples = read_back(out)
    got = {s["txt"].decode(): s["jpg"] for s in samples.values()}
    assert got == {f"cap {i}": images[i] for i in (0, 1, 2, 4, 5)}


def test_wds_reshard_keeps_every_member_and_respects_bytes(tmp_path):
    src = write_synthetic_shards(tmp_path / "src", samples=30, samples_per_shard=10, image_size=32, seed=4)
    originals = read_back_synth(src["files"])
    limit = 6 * 1024 * 4 + 10240  # about 4 samples of ~6 KiB
    out = tmp_path / "out"
    stats = run_import("wds", src["urls"], out, ImportOptions(samples_per_shard=100, shard_bytes=limit,
                                                             workers=0, prefix="re", progress=False))
    check_layout(out, 100)
    assert all(s["bytes"] <= limit for s in stats["shards"]) and len(stats["shards"]) > 3
    assert read_back(out) == originals
    # a truncated input shard: the rest of it is counted as bad_shard, the other shards still import
    data = Path(src["files"][1]).read_bytes()
    Path(src["files"][1]).write_bytes(data[: len(data) // 2])
    stats = run_import("wds", src["urls"], tmp_path / "out2", ImportOptions(workers=0, progress=False))
    skipped = dict(stats["skipped"])
    assert skipped.pop("bad_shard") == 1 and 20 <= stats["samples"] < 30
    assert sum(skipped.values()) <= 1  # the sample the cut went through, if it lost its caption or image


def read_back_synth(files: list[str]) -> dict[str, dict]:
    """key -> {ext: bytes} of shards, read by plain webdataset (file names left out)."""
    samples = wds.DataPipeline(wds.SimpleShardList(files), wds.tarfile_to_samples())
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


def test_safe_keys():
    assert safe_key("a/b.c d/e.f") == "a/b_c_d/e_f"
    assert safe_key("/../x/./y") == "x/y" and safe_key("") == "_"


def test_wds_import_makes_keys_safe_like_the_other_sources(tmp_path):
    raw = ["x", "../x", "/abs/y", "a/../../b", "sp ace", "ctl\x01ch\x7far", "./c//d"]
    members = [(f"{k}.{ext}", data) for i, k in enumerate(raw)
               for ext, data in (("jpg", image_bytes(colour=(i, 0, 0))), ("txt", f"caption {i}".encode()),
                                 ("json", b"{}"))]
    write_tar(tmp_path / "src.tar", members)
    stats = run_import("wds", str(tmp_path / "src.tar"), tmp_path / "out", ImportOptions(workers=0,
                                                                                        progress=False))
    with tarfile.open(tmp_path / "out" / stats["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert len(names) == 3 * len(raw)
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/") and "." not in name.split("/")
        assert name.isprintable() and " " not in name
    keys = sorted({n.split(".", 1)[0] for n in names})
    assert keys == sorted(["x", "x_dup1", "abs/y", "a/b", "sp_ace", "ctl_ch_ar", "c/d"])
    assert stats["renamed_duplicate_keys"] == 1  # "../x" -> "x" again: renamed, not merged or dropped
    samples = read_back(tmp_path / "out")
    assert samples["x"]["txt"] == b"caption 0" and samples["x_dup1"]["txt"] == b"caption 1"
    assert samples["ctl_ch_ar"]["txt"] == b"caption 5" and samples["c/d"]["json"] == b"{}"


class _NoLength(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; /endless.jpg is a JPEG followed by zeros, with no Content-Length, forever."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/endless.jpg":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        try:
            self.wfile.write(image_bytes())
            while True:
                self.wfile.write(b"\0" * 65536)
        except OSError:  # the client stopped reading
            pass


def test_importers_skip_images_over_the_byte_limit(tmp_path):
    (tmp_path / "imgs").mkdir()
    small, big = image_bytes(colour=(1, 2, 3)), image_bytes(colour=(3, 2, 1)) + b"\0" * 200_000
    (tmp_path / "imgs" / "small.jpg").write_bytes(small)
    (tmp_path / "imgs" / "big.jpg").write_bytes(big)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_NoLength, directory=str(tmp_path / "imgs")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = ["imgs/small.jpg", "imgs/big.jpg", f"{base}/small.jpg", f"{base}/big.jpg", f"{base}/endless.jpg"]
    lines = "".join(f"{r},row {i}\n" for i, r in enumerate(rows))
    (tmp_path / "pairs.csv").write_text(f"path,caption\n{lines}")
    try:
        stats = run_import("csv", str(tmp_path / "pairs.csv"), tmp_path / "out",
                           ImportOptions(workers=2, max_sample_bytes=10_000, progress=False))
    finally:
        server.shutdown()
    assert stats["skipped"] == {"too_large": 3}
    examples = " | ".join(stats["skipped_examples"]["too_large"])
    assert "big.jpg: 2" in examples  # the local file, from its size
    assert "Content-Length" in examples and "endless.jpg: more than 10000 bytes" in examples
    samples = read_back(tmp_path / "out")
    assert sorted(s["txt"] for s in samples.values()) == [b"row 0", b"row 2"]
    assert all(s["jpg"] == small for s in samples.values())

    # Parquet bytes and shards (through the CLI): the same limit, the same reason
    pq.write_table(pa.table({"image": [small, big], "caption": ["fits", "too big"]}), tmp_path / "p.parquet")
    stats = run_import("parquet", str(tmp_path / "p.parquet"), tmp_path / "pq",
                       ImportOptions(workers=0, max_sample_bytes=10_000, progress=False))
    assert stats["skipped"] == {"too_large": 1} and stats["samples"] == 1
    write_tar(tmp_path / "src.tar", [("a.jpg", small), ("a.txt", b"fits"), ("b.jpg", big), ("b.txt", b"big"),
                                     ("c.jpg", small), ("c.txt", b"fits too")])
    r = pretrain_cli("data", "import", "--from", "wds", str(tmp_path / "src.tar"), str(tmp_path / "wds"),
                     "--max-sample-bytes", "10kB", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["skipped"] == {"too_large": 1}
    assert sorted(read_back(tmp_path / "wds")) == ["a", "c"]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_import_and_inspect(tmp_path):
    spec, good = write_corrupt_shards(tmp_path / "bad")
    r = pretrain_cli("data", "inspect", spec, "--json", "--max-image-pixels", "1000000", "--workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["bad"] == EXPECTED_SKIPS and report["good"] == len(good) and report["shards"] == 5
    assert report["extensions"]["jpg"] >= len(good) and report["keys"]["duplicated"] == 0
    assert report["bad_examples"]["bad_text"] == ["badutf8: 'utf-8' codec can't decode byte 0xc3 in "
                                                  "position 0: invalid continuation byte"]
    text = format_report(report)
    assert f"{len(good)} usable" in text and "image_too_large: 1" in text and "c.tar" in text

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(image_bytes(colour=(i, i, i)))
        (folder / f"{i}.txt").write_text(f"grey {i}")
    r = pretrain_cli("data", "import", "--from", "folder", str(folder), str(tmp_path / "shards"),
             "--samples-per-shard", "2", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["samples"] == 5 and summary["shards"] == 3
    again = inspect_shards(summary["urls"])
    assert again["good"] == 5 and again["bad"] == {}
    assert again["extensions"] == {"jpg": 5, "json": 5, "txt": 5}
    missing = pretrain_cli("data", "import", "--from", "folder", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_cli_bench_prints_the_ratio(tmp_path):
    shards = write_synthetic_shards(tmp_path, samples=96, samples_per_shard=48, image_size=96, seed=0)
    r = pretrain_cli("bench", "data", "--shards", shards["urls"], "--batch-size", "8", "--workers", "1",
             "--image-size", "32", "--batches", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["ratio"] > 0 and result["ours"]["samples_per_s"] > 0
    assert result["reference"]["samples_per_cpu_s"] > 0 and "torchvision" in result["reference_pipeline"]
    speed = result["tokenize_captions_per_s"]  # both tokenizers on the same captions
    assert speed["bpe"] > 0 and speed["clip"] > 0 and speed["captions"] == 4096
