"""data.max_sample_bytes: a sample whose tar members add up to more bytes is skipped and counted as
`too_large` (once), without its oversized members ever being read into memory -- in training, in
`pretrain data inspect`, for local, `pipe:` and http shards. (The importers' side is in test_data_import.)
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from itertools import islice
from pathlib import Path

import pytest
from datautil import image_bytes, tiny_cfg, tiny_tokenizer, train_loader, write_tar
from tiny import pretrain_cli

from data_pipelines.inspection import inspect_shards
from data_pipelines.shardstream import shard_samples
from data_pipelines.stats import TOO_LARGE_KEY, SkipCounter
from data_pipelines.tokenizer import train_tokenizer_from_shards

LIMIT = 10_000
BIG = 200_000
GOOD = [f"a{i:03d}" for i in range(10)]


def _good(keys: list[str]) -> list[tuple[str, bytes]]:
    return [m for k in keys for m in ((f"{k}.jpg", image_bytes(colour=(int(k[1:]) * 20, 90, 160))),
                                      (f"{k}.txt", f"a red square {k}".encode()))]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """10 good samples around `huge` (a valid JPEG padded to 200 kB, and a 200 kB .json: two oversized
    members, one sample) and `pair` (two 6 kB members: each under the limit, together over it)."""
    d = tmp_path_factory.mktemp("limits")
    huge = [("huge.jpg", image_bytes() + b"\0" * BIG), ("huge.txt", b"a huge square"),
            ("huge.json", b" " * BIG)]
    pair = [("pair.jpg", image_bytes() + b"\0" * 6000), ("pair.txt", b"a pair"), ("pair.json", b" " * 6000)]
    write_tar(d / "s.tar", _good(GOOD[:4]) + huge + _good(GOOD[4:8]) + pair + _good(GOOD[8:]))
    return d / "s.tar"


def test_training_skips_and_counts_an_oversized_sample_once(shard):
    cfg = tiny_cfg(str(shard), workers=0, batch=2, buffer=0, interleave=1)
    cfg.data.shard_shuffle = False
    cfg.data.max_sample_bytes = LIMIT
    loader = train_loader(cfg, tiny_tokenizer(), rank=0, world=1)
    batches = list(islice(iter(loader), len(GOOD) // 2))  # epoch 0 exactly: 10 good samples
    assert [k for b in batches for k in b["_keys"]] == GOOD
    assert batches[-1]["_skips"] == {"too_large": 2}
    assert batches[-1]["_position"]["offset"] == 12  # skipped samples keep their places in the shard

    cfg.data.max_sample_bytes = 0  # no limit: both are delivered
    loader = train_loader(cfg, tiny_tokenizer(), rank=0, world=1)
    batches = list(islice(iter(loader), 6))
    assert {"huge", "pair"} <= {k for b in batches for k in b["_keys"]}
    assert batches[-1]["_skips"] == {}


def test_inspect_reports_what_training_skips(shard):
    report = inspect_shards(str(shard), max_sample_bytes=LIMIT)
    assert report["bad"] == {"too_large": 2} and report["good"] == len(GOOD) and report["samples"] == 12
    assert report["bad_examples"]["too_large"][0].startswith("huge: huge.jpg: 2")
    assert report["extensions"] == {"jpg": 11, "txt": 11}  # huge.*, pair.json: never read
    r = pretrain_cli("data", "inspect", str(shard), "--json", "--max-sample-bytes", "10kB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["bad"] == {"too_large": 2}
    assert inspect_shards(str(shard))["bad"] == {}  # the 64 MiB default


def test_the_tokenizer_skips_the_same_samples(shard, caplog):
    """It reads captions only, yet skips (and counts) exactly the samples training skips."""
    train_tokenizer_from_shards(str(shard), vocab_size=64, max_samples=100, max_sample_bytes=LIMIT)
    assert "tokenizer training skipped: {'too_large': 2}" in caplog.text


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_streamed_shards_http_and_pipe(shard):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(shard.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{shard.name}"
    skips = SkipCounter()
    try:
        samples = list(shard_samples([url, f"pipe:cat {shard}"], skips, max_bytes=LIMIT))
    finally:
        server.shutdown()
    assert skips.as_dict() == {}  # both shards read to their end-of-archive marker
    assert [s["__key__"] for s in samples] == 2 * (GOOD[:4] + ["huge"] + GOOD[4:8] + ["pair"] + GOOD[8:])
    marked = [s for s in samples if TOO_LARGE_KEY in s]
    assert [s["__key__"] for s in marked] == ["huge", "pair"] * 2
    for s in marked:  # only what came before the limit was read
        assert sum(len(v) for k, v in s.items() if not k.startswith("__")) <= LIMIT


def test_a_huge_metadata_header_is_a_bad_shard(tmp_path):
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("p.txt")
        info.pax_headers = {"comment": "x" * BIG}  # tarfile would read this header whole
        tar.addfile(info, io.BytesIO(b""))
    write_tar(tmp_path / "ok.tar", _good(GOOD[:2]))
    skips = SkipCounter()
    samples = list(shard_samples([str(tmp_path / "pax.tar"), str(tmp_path / "ok.tar")], skips,
                                 max_bytes=LIMIT))
    assert [s["__key__"] for s in samples] == GOOD[:2] and skips.as_dict() == {"bad_shard": 1}


_MEASURE = """
import json, sys
from data_pipelines.inspection import inspect_shards

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
report = inspect_shards(sys.argv[1], max_sample_bytes=1 << 20)
print(json.dumps({"growth": hwm() - base, "bad": report["bad"], "good": report["good"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_an_oversized_member_is_never_held_in_memory(tmp_path):
    """A 300 MB member (a sparse hole: no disk used) between two good samples, read from a file and
    through `pipe:cat`: the peak memory of the reading process grows by far less than 300 MB."""
    size = 300 << 20
    path = tmp_path / "big.tar"
    head, tail = io.BytesIO(), io.BytesIO()
    for buf, key in ((head, "g0"), (tail, "g1")):
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in _good([key]):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo("big.jpg")
    info.size = size
    with open(path, "wb") as fh:
        fh.write(_members_only(head))
        fh.write(info.tobuf(tarfile.GNU_FORMAT))
        fh.seek(size, io.SEEK_CUR)  # the member's data: a hole reading back as zeros
        fh.write(_members_only(tail))
        fh.write(b"\0" * 1024)  # end-of-archive marker
    assert path.stat().st_size > size
    r = subprocess.run([sys.executable, "-c", _MEASURE, f"{path}::pipe:cat {path}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["bad"] == {"too_large": 2} and out["good"] == 4
    assert out["growth"] < 50 << 20, f"peak memory grew by {out['growth'] / 2**20:.0f} MiB"


def _members_only(buf: io.BytesIO) -> bytes:
    """A tar written by tarfile without its end-of-archive marker and record padding."""
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return buf.getvalue()[:end]
