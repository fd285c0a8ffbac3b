"""`data import` and its OUT folder: never destroys its source, refuses a used OUT unless --overwrite, swaps
the new shards in only once the import succeeded (a failed import leaves OUT as it was), keeps other
prefixes' sizes.json/stats.json entries; ShardWriter writes no sizes.json when it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datautil import good_members, image_bytes, write_tar
from tiny import pretrain_cli

import data_pipelines.import_output as import_output
from data_pipelines.importers import ImportOptions, run_import
from data_pipelines.shardwriter import ShardWriter


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def opts(**kw) -> ImportOptions:
    return ImportOptions(workers=0, progress=False, **{"samples_per_shard": 10, **kw})


def test_an_out_holding_the_source_is_refused_even_with_overwrite(tmp_path):
    """Re-sharding `d/shard-{0..3}.tar` into `d` replaced source shards before they were read."""
    d = tmp_path / "d"
    d.mkdir()
    for s in range(4):
        write_tar(d / f"shard-{s:06d}.tar", good_members(f"s{s}_", 20))
    before = snapshot(d)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"contains .*shard-000000.tar, which this import reads"):
            run_import("wds", f"{d}/shard-{{000000..000003}}.tar", d, opts(overwrite=overwrite))
        with pytest.raises(ValueError, match="which this import reads"):  # OUT above the source, a symlink
            run_import("wds", f"file://{d}/shard-000002.tar", tmp_path, opts(overwrite=overwrite))
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(ValueError, match="which this import reads"):
        run_import("wds", str(d / "shard-000001.tar"), tmp_path / "link", opts(overwrite=True))
    (d / "pairs.csv").write_text("image,caption\nx.jpg,x\n")
    with pytest.raises(ValueError, match="which this import reads"):
        run_import("csv", str(d / "pairs.csv"), d, opts(overwrite=True))
    with pytest.raises(ValueError, match="which this import reads"):
        run_import("folder", str(d), d, opts(overwrite=True))
    assert snapshot(d) == {**before, "pairs.csv": b"image,caption\nx.jpg,x\n"}


def test_a_used_out_is_refused_and_overwrite_replaces_only_that_prefix(tmp_path):
    write_tar(tmp_path / "old.tar", good_members("old", 30))
    write_tar(tmp_path / "new.tar", good_members("new", 10))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "old.tar"), out, opts())
    assert sorted(json.loads((out / "sizes.json").read_text())) == [f"shard-00000{i}.tar" for i in range(3)]
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"OUT .*out is not empty \(notes.txt, shard-000000.tar.*overwrite"):
        run_import("wds", str(tmp_path / "new.tar"), out, opts())
    assert snapshot(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_import("wds", str(tmp_path / "new.tar"), empty, opts())["samples"] == 10  # empty is fine

    stats = run_import("wds", str(tmp_path / "new.tar"), out, opts(overwrite=True))
    # no stale shard-000001/2.tar for a brace spec to mix in; other files stay; no staging left
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar", "sizes.json",
                                                      "stats.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 10}
    assert stats["samples"] == 10
    assert json.loads((out / "stats.json").read_text())["shards"] == stats["shards"]
    assert (out / "notes.txt").read_text() == "mine"


def test_another_prefix_keeps_the_first_imports_entries(tmp_path):
    write_tar(tmp_path / "a.tar", good_members("a", 15))
    write_tar(tmp_path / "b.tar", good_members("b", 5))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "a.tar"), out, opts(prefix="a"))
    run_import("wds", str(tmp_path / "b.tar"), out, opts(prefix="b", overwrite=True))
    sizes = {"a-000000.tar": 10, "a-000001.tar": 5, "b-000000.tar": 5}
    assert json.loads((out / "sizes.json").read_text()) == sizes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["options"]["prefix"] == "b" and stats["other_prefixes"]["a"]["samples"] == 15
    run_import("wds", str(tmp_path / "a.tar"), out, opts(prefix="a", samples_per_shard=20, overwrite=True))
    assert json.loads((out / "sizes.json").read_text()) == {"a-000000.tar": 15, "b-000000.tar": 5}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["options"]["prefix"] == "a" and list(stats["other_prefixes"]) == ["b"]
    with pytest.raises(ValueError, match="--prefix '../x'"):
        run_import("wds", str(tmp_path / "a.tar"), out, opts(prefix="../x", overwrite=True))


class _Crash(BaseException):
    """Stands for a kill or Ctrl-C halfway through an import."""


def crash_after_25(ref: str) -> bytes:
    if ref.endswith("25.jpg"):
        raise _Crash(ref)
    return Path(ref).read_bytes()


def test_a_failed_import_leaves_out_as_it_was(tmp_path):
    """With --overwrite the previous import must survive a failed new one; a new OUT is not left with
    shards that look finished (or an empty sizes.json)."""
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(image_bytes(colour=(i, 0, 0)))
    rows = "".join(f"imgs/{i}.jpg,cap {i}\n" for i in range(40))
    (tmp_path / "pairs.csv").write_text(f"image,caption\n{rows}")
    write_tar(tmp_path / "old.tar", good_members("old", 30))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "old.tar"), out, opts())
    before = snapshot(out)
    with pytest.raises(_Crash):  # two new shards were finished when it failed
        run_import("csv", str(tmp_path / "pairs.csv"), out, opts(overwrite=True), opener=crash_after_25)
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="produced no samples.*empty_caption: 0000"):
        (tmp_path / "nocaps.csv").write_text("image,caption\nimgs/1.jpg,\n")
        run_import("csv", str(tmp_path / "nocaps.csv"), out, opts(overwrite=True))
    assert snapshot(out) == before
    with pytest.raises(_Crash):
        run_import("csv", str(tmp_path / "pairs.csv"), tmp_path / "new", opts(), opener=crash_after_25)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="is not a directory"):
        run_import("folder", str(tmp_path / "nope"), tmp_path / "new2", opts())
    assert not (tmp_path / "new2").exists()


def test_shard_writer_writes_no_sizes_json_when_failing(tmp_path):
    for n in (0, 3):  # before the first shard opened (used to write {} as if finished), after shards
        out = tmp_path / f"w{n}"
        with pytest.raises(RuntimeError), ShardWriter(out, max_samples=1) as writer:
            for i in range(n):
                writer.write({"__key__": f"k{i}", "txt": b"x"})
            raise RuntimeError("source failed")
        assert not (out / "sizes.json").exists() and not list(out.glob(".*.tmp"))
        assert len(list(out.glob("shard-*.tar"))) == max(n - 1, 0)


def test_cli_overwrite_flag(tmp_path):
    write_tar(tmp_path / "src.tar", good_members("k", 4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    args = ["data", "import", "--from", "wds", str(tmp_path / "src.tar"), str(out), "--workers", "0",
            "--no-progress"]
    r = pretrain_cli(*args)
    assert r.returncode == 2 and "is not empty (x)" in r.stderr and "Traceback" not in r.stderr
    r = pretrain_cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["samples"] == 4 and sorted(p.name for p in out.iterdir()) == [
        "shard-000000.tar", "sizes.json", "stats.json", "x"]


def test_an_import_stopped_while_moving_its_shards_keeps_the_ones_not_moved(tmp_path, monkeypatch, caplog):
    """Once `commit` has begun replacing the previous import's shards, OUT cannot be as it was; the shards
    not moved yet stay in the staging folder and the log says what OUT holds."""
    write_tar(tmp_path / "old.tar", good_members("old", 30))
    write_tar(tmp_path / "new.tar", good_members("new", 30))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "old.tar"), out, opts())
    real, moved = import_output.os.replace, []

    def replace_then_fail(src, dst):  # the second shard moved from staging into OUT is interrupted
        if Path(src).parent.name == import_output.STAGING and Path(dst).parent == out:
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(import_output.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run_import("wds", str(tmp_path / "new.tar"), out, opts(overwrite=True))
    staged = sorted(p.name for p in (out / import_output.STAGING).iterdir())
    assert staged and not (out / "sizes.json").exists()
    assert "stopped while moving its shards" in caplog.text


# ------------------------------------------------------------------ a staging folder found by the next import
_CHILD = """
import os, signal, sys, time
from pathlib import Path
from data_pipelines.importers import ImportOptions, run_import
csv, out, mode, flag = sys.argv[1:5]
def opener(ref):
    if ref.endswith("/35.jpg"):  # records are loaded 32 at a time: three shards are written by then
        if mode == "kill":  # a kill -9 or a power cut: nothing of the import's own clean-up runs
            os.kill(os.getpid(), signal.SIGKILL)
        Path(flag).write_text("waiting")  # a long import, still running
        deadline = time.monotonic() + 120
        while not Path(flag + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return Path(ref).read_bytes()
opts = ImportOptions(workers=0, progress=False, samples_per_shard=10, overwrite=True)
run_import("csv", csv, out, opts, opener=opener)
"""


def _forty_rows(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(image_bytes(colour=(i, 0, 0)))
    rows = "".join(f"imgs/{i}.jpg,cap {i}\n" for i in range(40))
    (tmp_path / "pairs.csv").write_text(f"image,caption\n{rows}")
    return tmp_path / "pairs.csv"


def _child(csv: Path, out: Path, mode: str, flag: Path) -> subprocess.Popen:
    from tiny import ROOT

    return subprocess.Popen([sys.executable, "-c", _CHILD, str(csv), str(out), mode, str(flag)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_staging_folder_of_a_killed_import_is_named_and_removed(tmp_path, caplog):
    """An import killed while writing (no clean-up ran) left only its unfinished shards in OUT/.import-tmp;
    the next import was refused with 'OUT is not empty (.import-tmp)' and a hint about --overwrite."""
    csv, out = _forty_rows(tmp_path), tmp_path / "out"
    child = _child(csv, out, "kill", tmp_path / "flag")
    assert child.wait(timeout=120) == -signal.SIGKILL, child.communicate()[1][-2000:]
    staged = sorted(p.name for p in (out / import_output.STAGING).iterdir())
    assert "shard-000002.tar" in staged and "sizes.json" not in staged and os.listdir(out) == [".import-tmp"]
    stats = run_import("csv", str(csv), out, opts())  # no --overwrite needed: OUT held nothing else
    assert stats["samples"] == 40 and sorted(os.listdir(out)) == [f"shard-00000{i}.tar" for i in range(4)] + [
        "sizes.json", "stats.json"]
    assert f"removing {out / '.import-tmp'}, left by an import that stopped before it had" in caplog.text



def _stopped_while_moving(tar: Path, out: Path, monkeypatch) -> None:
    """An --overwrite import of `tar` into `out` interrupted while moving its second shard into OUT."""
    real = import_output.os.replace

    def replace_then_fail(src, dst):
        if Path(src).parent.name == import_output.STAGING and Path(src).name == "shard-000001.tar":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(import_output.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run_import("wds", str(tar), out, opts(overwrite=True))
    monkeypatch.setattr(import_output.os, "replace", real)


def test_a_staging_folder_holding_a_whole_import_stays_until_that_import_is_rerun(tmp_path, monkeypatch,
                                                                                 caplog):
    """After an import stopped while moving its shards into OUT, an --overwrite import with another prefix
    deleted the shards not moved yet (a log line, 'left by an import that did not finish'), leaving OUT
    with half of each import for good. Now only a rerun with that prefix (which replaces them) removes it."""
    write_tar(tmp_path / "old.tar", good_members("old", 30))
    write_tar(tmp_path / "new.tar", good_members("new", 30))
    write_tar(tmp_path / "b.tar", good_members("b", 5))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "old.tar"), out, opts())
    _stopped_while_moving(tmp_path / "new.tar", out, monkeypatch)
    before = snapshot(out)
    assert ".import-tmp/shard-000001.tar" in before and "sizes.json" not in before
    for prefix, overwrite in (("b", True), ("b", False), ("shard", False)):
        with pytest.raises(ValueError, match=r"out/\.import-tmp holds the shards of an import with --prefix "
                                             r"shard that stopped .* again with --overwrite --prefix shard"):
            run_import("wds", str(tmp_path / "b.tar"), out, opts(prefix=prefix, overwrite=overwrite))
        assert snapshot(out) == before
    run_import("wds", str(tmp_path / "new.tar"), out, opts(overwrite=True))
    assert "the shards of an earlier import with --prefix shard that stopped" in caplog.text
    assert json.loads((out / "sizes.json").read_text()) == {f"shard-00000{i}.tar": 10 for i in range(3)}
    assert not (out / import_output.STAGING).exists()
    assert all(b"old" not in (out / f"shard-00000{i}.tar").read_bytes() for i in range(3))


def test_an_import_still_running_into_out_is_left_alone(tmp_path):
    """A second --overwrite import into the same OUT removed the first one's staging folder while it was
    still writing there (and the first could then move the second's shards into OUT)."""
    csv, out, flag = _forty_rows(tmp_path), tmp_path / "out", tmp_path / "flag"
    write_tar(tmp_path / "b.tar", good_members("b", 5))
    child = _child(csv, out, "wait", flag)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), child.communicate()[1][-2000:]
        for overwrite in (True, False):
            with pytest.raises(ValueError, match=r"out/\.import-tmp is in use by another import into .*still "
                                                 "running"):
                run_import("wds", str(tmp_path / "b.tar"), out, opts(overwrite=overwrite))
    finally:
        Path(f"{flag}.go").write_text("")
        rc = child.wait(timeout=120)
    assert rc == 0, child.communicate()[1][-2000:]
    assert json.loads((out / "sizes.json").read_text()) == {f"shard-00000{i}.tar": 10 for i in range(4)}
    assert not (out / import_output.STAGING).exists()


def test_import_reads_local_shard_paths_as_the_loader_checks_them(tmp_path):
    """`source_paths` had its own copy of the file: URL rule in `urls`; one public helper serves both."""
    from data_pipelines.import_sources import source_paths
    from data_pipelines.urls import local_path

    assert [local_path(u) for u in ("file:///d/a.tar", "file:d/a.tar", "/d/a.tar", "d/a.tar")] == [
        "/d/a.tar", "d/a.tar", "/d/a.tar", "d/a.tar"]
    for name in ("a", "b"):
        write_tar(tmp_path / f"{name}.tar", good_members(name, 2))
    spec = f"file://{tmp_path}/a.tar::file:{tmp_path}/b.tar::{tmp_path}/a.tar::pipe:cat {tmp_path}/b.tar"
    assert source_paths("wds", spec) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar"),
                                         str(tmp_path / "a.tar")]


def test_a_rerun_after_a_stop_while_moving_keeps_the_other_prefixes_entries(tmp_path, monkeypatch):
    """OUT holds imports with prefixes `shard` and `b`; an --overwrite import of `shard` stops while moving
    its shards (sizes.json and stats.json were already out of the way); its rerun still lists b's shards."""
    write_tar(tmp_path / "old.tar", good_members("old", 30))
    write_tar(tmp_path / "new.tar", good_members("new", 30))
    write_tar(tmp_path / "b.tar", good_members("b", 5))
    out = tmp_path / "out"
    run_import("wds", str(tmp_path / "old.tar"), out, opts())
    run_import("wds", str(tmp_path / "b.tar"), out, opts(prefix="b", overwrite=True))
    _stopped_while_moving(tmp_path / "new.tar", out, monkeypatch)
    assert not (out / "sizes.json").exists()
    run_import("wds", str(tmp_path / "new.tar"), out, opts(overwrite=True))
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["b-000000.tar"] == 5 and sizes["shard-000000.tar"] == 10
    assert json.loads((out / "stats.json").read_text())["other_prefixes"]["b"]["samples"] == 5
    assert not list(out.glob(".*.previous"))
