"""Shard-level faults, counted right: a key repeated back to back is a second sample (not lost while
reported kept), a bad shard is counted once per shard per epoch however it is split or resumed, a truncated
shard loses its cut-off sample as part of `bad_shard` (not also as `missing_caption`), data after a tar's end
is flagged, and a folder or a vanished shard is named in words."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest
from datautil import good_members, image_bytes, tiny_cfg, tiny_tokenizer, train_loader, write_tar

from data_pipelines.cursor import StreamCursor
from data_pipelines.decode import split_sample
from data_pipelines.inspection import format_report, inspect_shard, inspect_shards
from data_pipelines.loader import make_eval_loader
from data_pipelines.plan import PlanParams, StreamState, redeal, remaining_work
from data_pipelines.shardstream import shard_samples
from data_pipelines.stats import SkipCounter
from data_pipelines.urls import expand_urls


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.ERROR, logger="data_pipelines")


def _read(url: str, max_bytes: int = 0) -> tuple[list[dict], dict[str, int]]:
    skips = SkipCounter()
    return list(shard_samples([url], skips, max_bytes=max_bytes)), skips.as_dict()


def _cut_after(path: Path, member: str, extra: int = 0) -> None:
    """Truncate the tar right after `member`'s padded data (a header boundary), or `extra` bytes into it."""
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name == member)
    end = m.offset_data + (extra if extra else (m.size + 511) // 512 * 512)
    path.write_bytes(path.read_bytes()[:end])


# ------------------------------------------------------------------------------------ repeated keys
def test_a_key_repeated_back_to_back_is_a_second_sample_not_a_lost_one(tmp_path):
    red, blue = image_bytes(colour=(255, 0, 0)), image_bytes(colour=(0, 0, 255))
    path = tmp_path / "dup.tar"  # two exports concatenated: a, a, then b with a stray second caption
    write_tar(path, [("a.jpg", red), ("a.txt", b"red"), ("a.jpg", blue), ("a.txt", b"blue"),
                     ("b.jpg", red), ("b.txt", b"b"), ("b.txt", b"b again")])
    samples, skips = _read(str(path))
    assert [(s["__key__"], s.get("jpg"), s["txt"]) for s in samples] == [
        ("a", red, b"red"), ("a", blue, b"blue"), ("b", red, b"b"), ("b", None, b"b again")]
    assert skips == {"duplicate_key": 2}
    checks = SkipCounter()
    assert [split_sample(s, checks) is not None for s in samples] == [True, True, True, False]
    assert checks.as_dict() == {"missing_image": 1}  # the stray caption is a sample without an image

    report = inspect_shards(str(path))
    assert (report["samples"], report["good"], report["keys"]["duplicated"]) == (4, 3, 2)
    assert report["bad"] == {"duplicate_key": 2, "missing_image": 1}
    assert "duplicate_key: 2 (sample kept)" in format_report(report)


def test_the_byte_limit_applies_to_each_of_two_samples_with_one_key(tmp_path):
    """The limit sums members per sample; the repeat is a new sample, so two that each fit both pass."""
    data = image_bytes("PNG", (64, 64))
    path = tmp_path / "dup.tar"
    write_tar(path, [("a.png", data), ("a.txt", b"one"), ("a.png", data), ("a.txt", b"two")])
    samples, skips = _read(str(path), max_bytes=len(data) + 100)
    assert [s["txt"] for s in samples] == [b"one", b"two"] and skips == {"duplicate_key": 1}
    assert not any("__too_large__" in s for s in samples)


# ----------------------------------------------------------------------- once per shard per epoch
def _faulty(d: Path) -> str:
    """8 samples, a key repeated after sample 2, cut inside the last image: 2 shard-level problems."""
    d.mkdir(parents=True, exist_ok=True)
    members = good_members("k", 8)
    members[6:6] = [("k002.jpg", image_bytes()), ("k002.txt", b"again")]
    write_tar(d / "bad.tar", members)
    _cut_after(d / "bad.tar", "k007.jpg", extra=20)
    return str(d / "bad.tar")


def _run(urls, params, state, stream, streams, stop=None) -> int:
    """Read one stream of one epoch like the loader does (counts into state.skips); `stop`: samples."""
    skips = SkipCounter()
    skips.restore(state.skips)
    cursor = StreamCursor(urls, params, state, stream, streams, 2, skips)
    taken = 0
    while (stop is None or taken < stop) and state.epoch == 0:
        if cursor.next_in_epoch() is None:
            cursor.next_epoch()
            continue
        taken += 1
    state.skips = skips.as_dict()
    return taken


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_a_shard_split_into_strided_items_is_counted_once(tmp_path, streams):
    urls = [_faulty(tmp_path)]
    params = PlanParams(num_shards=1, seed=0, shard_shuffle=True, block=3)
    states = [StreamState() for _ in range(streams)]
    taken = sum(_run(urls, params, states[g], g, streams) for g in range(streams))
    skips = [s.skips for s in states]
    assert taken == 8 and sum(s.get("bad_shard", 0) for s in skips) == 1, skips
    assert sum(s.get("duplicate_key", 0) for s in skips) == 1 and sum(s.shards for s in states) == 1


@pytest.mark.parametrize("block", [1, 3, 4])
def test_resuming_anywhere_counts_shard_problems_once(tmp_path, block):
    """Stop after k samples, resume from the saved state (the shard is re-read from byte 0): the epoch's
    totals match the uninterrupted ones for every k; bad_shard_frac can no longer pass 100%."""
    urls = [_faulty(tmp_path)]
    params = PlanParams(num_shards=1, seed=0, shard_shuffle=True, block=block)
    whole = StreamState()
    assert _run(urls, params, whole, 0, 1) == 8
    assert whole.skips == {"bad_shard": 1, "duplicate_key": 1} and whole.shards == 1
    for k in range(9):
        state = StreamState()
        _run(urls, params, state, 0, 1, stop=k)
        for _ in range(2):  # two requeues in a row, one sample each
            state = StreamState.from_dict(state.as_dict(0))
            _run(urls, params, state, 0, 1, stop=1)
        state = StreamState.from_dict(state.as_dict(0))
        _run(urls, params, state, 0, 1)
        assert (state.skips, state.shards) == (whole.skips, whole.shards), k


def test_an_elastic_redeal_counts_shard_problems_once(tmp_path):
    """2 streams stop part-way, their unread work is re-dealt to 3 streams: old + new counts = one epoch's."""
    urls = [_faulty(tmp_path / "a"), str(tmp_path / "good.tar")]
    write_tar(tmp_path / "good.tar", good_members("g", 5))
    params = PlanParams(num_shards=2, seed=1, shard_shuffle=True, block=2)
    for stop in range(0, 8):
        old = {g: StreamState() for g in range(4)}
        for g in old:
            _run(urls, params, old[g], g, 4, stop=stop)
        new = redeal(remaining_work(old, params, 4), 3)
        for g in new:
            _run(urls, params, new[g], g, 3)
        states = [*old.values(), *new.values()]
        total = {r: sum(s.skips.get(r, 0) for s in states) for r in ("bad_shard", "duplicate_key")}
        assert total == {"bad_shard": 1, "duplicate_key": 1} and sum(s.shards for s in states) == 2, stop


def test_eval_streams_that_all_read_a_shard_count_it_once(tmp_path):
    path = tmp_path / "cut.tar"
    write_tar(path, good_members("k", 6))
    _cut_after(path, "k005.jpg", extra=20)
    tok = tiny_tokenizer()
    bad = 0
    for rank in range(2):  # one shard, two ranks: both read every byte, each decodes every other sample
        # (one batch per rank, made after the end of the shard, so it carries the shard's count)
        (batch,) = make_eval_loader(str(path), tok, 32, 10, 16, [0.5] * 3, [0.5] * 3, rank=rank, world=2)
        assert len(batch["_keys"]) == (3 if rank == 0 else 2)
        bad += batch["_skips"].get("bad_shard", 0)
    assert bad == 1


# ---------------------------------------------------------------------------------- shard ends
@pytest.mark.parametrize("cut, kept", [
    ("header", ["k000", "k001"]),  # after k002.jpg: the tar reader stops silently, k002 has no caption
    ("member", ["k000", "k001"]),  # inside k002.txt: the tar reader raises
    ("between", ["k000", "k001", "k002"]),  # after k002.txt: every sample read is whole
])
def test_a_truncated_shard_loses_its_cut_sample_as_part_of_the_bad_shard(tmp_path, cut, kept):
    path = tmp_path / "cut.tar"
    write_tar(path, good_members("k", 4))
    member, extra = {"header": ("k002.jpg", 0), "member": ("k002.txt", 5), "between": ("k002.txt", 0)}[cut]
    _cut_after(path, member, extra)
    samples, skips = _read(str(path))
    assert [s["__key__"] for s in samples] == kept and skips == {"bad_shard": 1}
    report = inspect_shard(str(path))
    assert report["samples"] == report["good"] == len(kept) and report["bad"] == {"bad_shard": 1}


def test_data_after_the_end_of_archive_is_flagged_zero_padding_is_not(tmp_path):
    write_tar(tmp_path / "a.tar", good_members("a", 5))
    write_tar(tmp_path / "b.tar", good_members("b", 5))
    a, b = (tmp_path / "a.tar").read_bytes(), (tmp_path / "b.tar").read_bytes()
    (tmp_path / "ab.tar").write_bytes(a + b)  # `cat a.tar b.tar`: tar readers stop after a's 5 samples
    (tmp_path / "padded.tar").write_bytes(a + bytes(400 * 512))
    corrupt = bytearray(a + b"")
    with tarfile.open(tmp_path / "a.tar") as tar:
        header = next(m for m in tar.getmembers() if m.name == "a003.jpg").offset
    corrupt[header:header + 512] = b"\x07" * 512  # a garbage header: the tar reader stops silently there
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))

    report = inspect_shard(str(tmp_path / "ab.tar"))
    assert (report["samples"], report["bad"]) == (5, {"bad_shard": 1})
    assert "stopped at byte" in report["examples"]["bad_shard"][0]
    assert "data follows" in report["examples"]["bad_shard"][0]
    assert inspect_shard(str(tmp_path / "padded.tar"))["bad"] == {}
    report = inspect_shard(str(tmp_path / "corrupt.tar"))
    assert (report["samples"], report["bad"]) == (3, {"bad_shard": 1})


def test_a_folder_as_data_train_fails_at_start_up_with_a_spec_to_use(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"shard-{i:06d}.tar", good_members(f"s{i}_", 2))
    with pytest.raises(ValueError, match=rf"{tmp_path} is a directory, not a tar shard; name its 3 shards, "
                                         rf"e\.g\. {tmp_path}/shard-\{{000000\.\.000002\}}\.tar"):
        train_loader(tiny_cfg(str(tmp_path)), tiny_tokenizer(), rank=0, world=1)
    assert len(expand_urls(f"{tmp_path}/shard-{{000000..000002}}.tar")) == 3


def test_an_os_error_is_described_in_words_not_by_its_errno(tmp_path):
    (tmp_path / "dir.tar").mkdir()
    for url, words in ((tmp_path / "gone.tar", "FileNotFoundError: No such file or directory"),
                       (tmp_path / "dir.tar", "IsADirectoryError: Is a directory")):
        report = inspect_shard(str(url))  # a shard that vanished (or changed) after the start-up check
        assert report["bad"] == {"bad_shard": 1} and words in report["examples"]["bad_shard"][0]
