"""Review 6 (data): keys holding a '.' (`photo.0001.jpg`) read as the samples the files form, or counted;
`::` inside an IPv6 host or a pipe: command's quotes is no source separator; an elastic resume that re-deals
an already-read item does not report its shard as empty."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from datautil import (
    assert_exactly_once,
    good_members,
    image_bytes,
    run_ranks,
    tiny_cfg,
    tiny_tokenizer,
    train_loader,
    write_tar,
)

from data_pipelines.decode import split_sample
from data_pipelines.inspection import format_report, inspect_shards
from data_pipelines.shardstream import shard_samples
from data_pipelines.stats import DataQualityError, SkipCounter
from data_pipelines.urls import expand_sources, expand_urls, split_sources


def _read(path: Path, **kwargs) -> tuple[list[dict], dict[str, int]]:
    skips = SkipCounter(first_warnings=0)
    return list(shard_samples([str(path)], skips, **kwargs)), skips.as_dict()


def _pairs(names: list[str]) -> list[tuple[str, bytes]]:
    """`NAME.jpg` + `NAME.txt` for each name (a plain `tar` of camera exports and their captions)."""
    return [m for i, n in enumerate(names) for m in ((f"{n}.jpg", image_bytes(colour=(20 * i, 90, 160))),
                                                      (f"{n}.txt", f"a red square {i}".encode()))]


# ------------------------------------------------------------------------------------------ dotted keys
@pytest.mark.parametrize("names", [[f"photo.{i:04d}" for i in range(10)],
                                   [f"IMG_{i:04d}.HEIC" for i in range(10)]])
def test_keys_with_a_dot_are_ten_samples_not_one(tmp_path, names):
    """Before: `photo.NNNN` gave ONE sample (key `photo`, extensions `0000.jpg` ...), `IMG_N.HEIC` ten
    samples with `heic.jpg` and no `jpg`: 10 pairs, 0 usable, 9 of them not even counted."""
    write_tar(tmp_path / "d.tar", _pairs(names))
    samples, skips = _read(tmp_path / "d.tar")
    assert [s["__key__"] for s in samples] == names
    assert all(sorted(k for k in s if not k.startswith("__")) == ["jpg", "txt"] for s in samples)
    checks = SkipCounter()
    assert all(split_sample(s, checks) is not None for s in samples) and not checks.as_dict()
    assert skips == {"dotted_key": 10}  # counted, each sample kept
    report = inspect_shards(str(tmp_path / "d.tar"))
    assert (report["samples"], report["good"], report["extensions"]) == (10, 10, {"jpg": 10, "txt": 10})
    text = format_report(report)
    assert "10 samples, 10 usable" in text and "dotted_key: 10 (sample kept)" in text
    assert "holds a '.'" in text


def test_a_dotted_sample_without_its_caption_does_not_swallow_the_next(tmp_path):
    members = _pairs(["photo.0000"]) + [("photo.0001.jpg", image_bytes())] + _pairs(["photo.0002"])
    write_tar(tmp_path / "d.tar", members)
    samples, skips = _read(tmp_path / "d.tar")
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("photo.0000", ["jpg", "txt"]), ("photo.0001", ["jpg"]), ("photo.0002", ["jpg", "txt"])]
    assert skips == {"dotted_key": 3}


def test_multi_part_extensions_keep_webdatasets_meaning(tmp_path):
    """`KEY.neg.txt`, `KEY.seg.png`, `KEY.left.jpg KEY.right.jpg`: one sample per KEY, as in webdataset."""
    jpg = image_bytes()
    members = [("a.jpg", jpg), ("a.txt", b"a"), ("a.neg.txt", b"not a"),
               ("b.seg.png", jpg), ("b.jpg", jpg), ("b.txt", b"b"),
               ("c.left.jpg", jpg), ("c.right.jpg", jpg), ("c.txt", b"c"),
               ("d.left.jpg", jpg), ("d.right.jpg", jpg), ("d.jpg", jpg), ("d.txt", b"d")]
    write_tar(tmp_path / "m.tar", members)
    samples, skips = _read(tmp_path / "m.tar")
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("a", ["jpg", "neg.txt", "txt"]), ("b", ["jpg", "seg.png", "txt"]),
        ("c", ["left.jpg", "right.jpg", "txt"]), ("d", ["jpg", "left.jpg", "right.jpg", "txt"])]
    assert skips == {}


def test_dotted_names_that_cannot_be_told_apart_are_counted_and_named(tmp_path):
    """One member per `photo.NNNN` (images without captions) looks like `KEY.left.jpg KEY.right.jpg`: read
    as webdataset does, one sample, but counted as `dotted_key_merged` with the names, in inspect too."""
    write_tar(tmp_path / "i.tar", [(f"photo.{i:04d}.jpg", image_bytes()) for i in range(5)])
    samples, skips = _read(tmp_path / "i.tar")
    assert len(samples) == 1 and skips == {"dotted_key_merged": 1}
    text = format_report(inspect_shards(str(tmp_path / "i.tar")))
    assert "dotted_key_merged: 1" in text and "5 members of key 'photo'" in text
    assert "if the keys hold a '.', rename the files" in text


def test_every_reader_sees_the_same_dotted_samples(tmp_path):
    """The tokenizer reads captions only (`select_files`): the sample boundaries, keys and `txt` are the same
    whatever order the members come in, so positions and captions agree with training's."""
    names = [f"p.{i}" for i in range(4)]
    members = [m for pair in zip(_pairs(names)[1::2], _pairs(names)[0::2]) for m in pair]  # txt first
    write_tar(tmp_path / "t.tar", members)
    samples, skips = _read(tmp_path / "t.tar", select_files=lambda n: n.endswith(".txt"))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        (n, ["txt"]) for n in names]
    assert skips == {"dotted_key": 4}
    cut, _ = _read(tmp_path / "t.tar", max_bytes=200)  # every image over the limit: still 4 samples
    assert [s["__key__"] for s in cut] == names and all("__too_large__" in s for s in cut)


def test_training_reads_every_dotted_sample_once(tmp_path):
    write_tar(tmp_path / "d.tar", _pairs([f"photo.{i:04d}" for i in range(6)]))
    batch = next(iter(train_loader(tiny_cfg(str(tmp_path / "d.tar"), batch=6), tiny_tokenizer(), rank=0,
                                   world=1)))
    assert sorted(batch["_keys"]) == [f"photo.{i:04d}" for i in range(6)]
    assert batch["_skips"] == {"dotted_key": 6}


def test_a_dotted_key_count_is_no_sign_of_bad_data_for_an_empty_stream(tmp_path):
    """`dotted_key` is counted on kept samples: a stream left without samples (3 for 4 streams) is told the
    real cause, as with plain keys, not that its shard is bad (`DataQualityError`, "repair or remove")."""
    write_tar(tmp_path / "one.tar", _pairs([f"k.{i:03d}" for i in range(3)]))
    cfg = tiny_cfg(str(tmp_path / "one.tar"), batch=1)
    with pytest.raises(RuntimeError, match="fewer samples than the 4 streams") as info:
        next(iter(train_loader(cfg, tiny_tokenizer(), rank=3, world=4)))
    assert not isinstance(info.value, DataQualityError)


# ----------------------------------------------------------------------------------------- `::` sources
def test_ipv6_hosts_and_quoted_pipe_commands_are_one_source():
    """Before: `http://[::1]:8000/...` split into `http://[` and `1]:8000/...` ("2 of 2 local shard(s) do
    not exist")."""
    assert expand_sources("http://[::1]:8000/shard-{0..1}.tar") == [
        ["http://[::1]:8000/shard-0.tar", "http://[::1]:8000/shard-1.tar"]]
    assert expand_urls("pipe:curl -s http://[::1]/a.tar") == ["pipe:curl -s http://[::1]/a.tar"]
    spec = "http://[fe80::1%25eth0]:80/a.tar::pipe:cat 'x::y.tar'::pipe:perl -e \"A::b\" z"
    assert split_sources(spec) == ["http://[fe80::1%25eth0]:80/a.tar", "pipe:cat 'x::y.tar'",
                                   "pipe:perl -e \"A::b\" z"]


def test_the_source_separator_still_works(tmp_path):
    for name in ("a.tar", "b'.tar", "[c.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls("pipe:cat a{0..1}.tar::https://x/y.tar") == ["pipe:cat a0.tar", "pipe:cat a1.tar",
                                                                   "https://x/y.tar"]
    a, b, c = (str(tmp_path / n) for n in ("a.tar", "b'.tar", "[c.tar"))
    assert split_sources(f"{a}::pipe:cat {a}::{b}::{c}::{a}") == [a, f"pipe:cat {a}", b, c, a]
    assert split_sources(f"pipe:cat {a}::{b}") == [f"pipe:cat {a}", b]  # an unbalanced quote: no quoting
    assert len(expand_sources(f"{a}::{c}::{b}")) == 3  # a quote or an unclosed '[' in a path is a character
    with pytest.raises(ValueError, match="empty source between '::'"):
        expand_sources(f"{a}::::{b}")


# ------------------------------------------------------------------------------------- elastic re-deal
def test_a_redealt_item_read_to_its_end_is_not_reported_as_an_empty_shard(tmp_path, caplog):
    """1 rank reads 1 batch (3 samples) and stops with an item open at progress 3 of 3 (its reader had not
    seen the tar's end); 2 ranks resume. The stream dealt only that item used to warn its healthy shard
    'hold[s] no samples' and count a structural empty epoch. Coverage stays exact."""
    for i in range(2):
        write_tar(tmp_path / f"shard-{i:06d}.tar", good_members(f"s{i}", 3))
    spec = str(tmp_path / "shard-{000000..000001}.tar")
    cfg = tiny_cfg(spec, workers=0, batch=3, buffer=1, interleave=1)
    tok = tiny_tokenizer()
    first, position = run_ranks(cfg, tok, 1, batches=1)
    assert position[0]["workers"]["0"]["open"] == [[0, 3]]  # the case: an open item, fully read
    caplog.set_level(logging.WARNING, logger="data_pipelines")
    rest, _ = run_ranks(cfg, tok, 2, until_epoch=1, position=position)
    assert not [r.getMessage() for r in caplog.records if "no sample at all" in r.getMessage()]
    assert_exactly_once(first + rest, 0, {f"s{i}{j:03d}" for i in range(2) for j in range(3)})
