"""classnames.txt is read positionally, as CLIP_benchmark reads it (`[l.strip() for l in text.splitlines()]`):
a blank line is a class (warned about, naming the file and line), so `.cls` labels keep their names. Before,
blank lines were dropped and every later label was scored against the next line's name."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from datautil import image_bytes, write_tar

from data_pipelines.clip_benchmark import (
    CLASSNAMES_FILE,
    layout_for_clip_benchmark,
    read_classnames,
    read_lines,
    read_templates,
)
from pretrain.evaluation.evaluate import read_classnames as eval_read_classnames

OPEN_CLIP_PYTHON = Path(__file__).resolve().parents[2] / ".venv-openclip" / "bin" / "python"

TEXTS = [
    "red circle\nred square\nred triangle\n\ngreen circle\n",  # line 4 blank
    "a\nb\n",  # a final newline adds no class
    "a\nb",
    "a\nb\n\n",  # a blank last line does (as in CLIP_benchmark)
    "  a \r\n\t\r\nb\r\n",  # CRLF, whitespace-only line
    "\n\na\n",
]


def _clip_benchmark_reads(text: str) -> list[str]:
    """clip_benchmark 1.6.2 `build_wds_dataset`: `[line.strip() for line in read_txt(f).splitlines()]`."""
    return [line.strip() for line in text.splitlines()]


@pytest.mark.parametrize("text", TEXTS)
def test_blank_classname_line_not_dropped(tmp_path, text):
    path = tmp_path / CLASSNAMES_FILE
    path.write_bytes(text.encode())
    want = _clip_benchmark_reads(path.read_text())  # universal newlines, as clip_benchmark's open()
    assert read_lines(path, "class names") == want
    assert read_classnames(path) == want
    assert eval_read_classnames(path) == want  # what `pretrain eval` uses


def test_blank_classname_is_warned_naming_file_and_line(tmp_path, caplog):
    path = tmp_path / "warned" / CLASSNAMES_FILE
    path.parent.mkdir()
    path.write_text(TEXTS[0])
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        assert read_classnames(path)[3] == ""
        read_classnames(path)  # once per file and content
    warned = [r.getMessage() for r in caplog.records if "blank line" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "blank line 4:" in warned[0]
    assert "entry 3 (0-based)" in warned[0]


def test_only_blank_lines_is_refused(tmp_path):
    path = tmp_path / CLASSNAMES_FILE
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"{path}: no class names"):
        read_classnames(path)


def test_layout_keeps_the_blank_class_in_place(tmp_path):
    """`data clip-benchmark`: a label indexing the line after the blank one is in range, and the written
    classnames.txt reads back to the same list."""
    names = tmp_path / "names.txt"
    names.write_text(TEXTS[0])
    shard = tmp_path / "src" / "0.tar"
    shard.parent.mkdir()
    jpg = image_bytes()
    write_tar(shard, [("s0.jpg", jpg), ("s0.cls", b"4"), ("s1.jpg", jpg), ("s1.cls", b"0")])
    summary = layout_for_clip_benchmark([str(shard)], tmp_path / "cb", read_classnames(names))
    assert summary["classes"] == 5
    assert read_classnames(tmp_path / "cb" / CLASSNAMES_FILE) == _clip_benchmark_reads(TEXTS[0])


def test_template_lines_are_numbered_as_in_the_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {c}.\n\nno placeholder\n")
    with pytest.raises(ValueError, match="line 3 has no"):
        read_templates(path)
    path.write_text("a photo of a {c}.\n\nan image of a {c}.\n")
    assert read_templates(path) == ["a photo of a {}.", "an image of a {}."]


@pytest.mark.skipif(not OPEN_CLIP_PYTHON.exists(), reason=f"no {OPEN_CLIP_PYTHON} (clip_benchmark)")
def test_real_clip_benchmark_reads_the_same_classes(tmp_path):
    folders = []
    for i, text in enumerate(TEXTS):
        d = tmp_path / f"cb{i}"
        (d / "test").mkdir(parents=True)
        (d / "test" / "nshards.txt").write_text("1\n")
        (d / CLASSNAMES_FILE).write_bytes(text.encode())
        folders.append(str(d))
    code = ("import json, sys\nfrom clip_benchmark.datasets.builder import build_wds_dataset\n"
            "print(json.dumps([build_wds_dataset('wds/x', None, data_dir=d).classes for d in sys.argv[1:]]))")
    r = subprocess.run([str(OPEN_CLIP_PYTHON), "-c", code, *folders], capture_output=True, text=True,
                       timeout=300)
    if r.returncode and "No module named 'clip_benchmark" in r.stderr:
        pytest.skip(f"clip_benchmark is not installed in {OPEN_CLIP_PYTHON}")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    assert [read_classnames(Path(d) / CLASSNAMES_FILE) for d in folders] == theirs
