"""LAION CLIP_benchmark's dataset layout: templates files, `pretrain data clip-benchmark`, and what
`pretrain eval --data` resolves (folder or URLs, class names and prompts found beside the shards)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.clip_benchmark import EVAL_TEMPLATES, TEMPLATES_FILE, layout_for_clip_benchmark
from data_pipelines.synth import CLASSNAMES, write_synthetic_shards
from data_pipelines.urls import expand_urls
from pretrain.cli import main
from pretrain.evaluation.evaluate import TEMPLATES
from pretrain.evaluation.layout import read_templates, resolve_eval_data


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "val"
    write_synthetic_shards(out, samples=12, samples_per_shard=5, image_size=16, seed=3)
    return out


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path: Path, samples: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return str(path)


def test_templates_file_forms(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {c}.\n\n  itap of a {}.  \n")
    assert read_templates(f) == ["a photo of a {}.", "itap of a {}."]
    f.write_text("\n \n")
    with pytest.raises(ValueError, match=f"{f}: no zero-shot templates"):
        read_templates(f)
    f.write_text("a photo of a {c}.\na photo\n")
    with pytest.raises(ValueError, match="line 2 has no {c} placeholder"):
        read_templates(f)
    f.write_text("a {c} with a } brace\n")
    with pytest.raises(ValueError, match="line 1 is not a valid template"):
        read_templates(f)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_templates(tmp_path / "nope.txt")


def test_synth_writes_our_eval_prompts_in_clip_benchmark_form(synth):
    """The stored file is in `{c}` form, and equals `pretrain eval`'s built-in prompts: finding it beside
    the shards changes no score, and CLIP_benchmark gets the same prompts."""
    lines = (synth / TEMPLATES_FILE).read_text().splitlines()
    assert lines == list(EVAL_TEMPLATES) and all("{c}" in t for t in lines)
    assert read_templates(synth / TEMPLATES_FILE) == list(TEMPLATES)


def test_digits_writer_writes_the_templates_too(tmp_path):
    from data_pipelines.digits import write_digits

    write_digits(tmp_path, image_size=8, val_every=5, per_shard=2000)
    for split in ("train", "val"):
        assert read_templates(tmp_path / split / TEMPLATES_FILE) == list(TEMPLATES)


def test_layout_round_trip(synth, tmp_path):
    shards = expand_urls(f"{synth}/shard-{{000000..000002}}.tar")
    out = tmp_path / "cb"
    s = layout_for_clip_benchmark(shards, out, CLASSNAMES, ["itap of a {c}.", "a {} drawing."])
    assert s["samples"] == 12 and s["shards"] == 3
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"
    assert [p.name for p in sorted((out / "test").glob("*.tar"))] == ["0.tar", "1.tar", "2.tar"]
    assert (out / "test" / "1.tar").read_bytes() == Path(shards[1]).read_bytes()
    assert (out / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert (out / TEMPLATES_FILE).read_text().splitlines() == ["itap of a {c}.", "a {c} drawing."]
    ds = resolve_eval_data(str(out))
    assert ds.layout == "clip_benchmark" and ds.classnames == out / "classnames.txt"
    assert expand_urls(ds.urls) == [str(out / "test" / f"{i}.tar") for i in range(3)]
    assert ds.templates == ["itap of a {}.", "a {} drawing."]
    # the split's shard URLs alone: the two text files are found one folder up, as CLIP_benchmark keeps them
    ds = resolve_eval_data(str(out / "test" / "{0..2}.tar"))
    assert ds.classnames == out / "classnames.txt" and ds.templates == ["itap of a {}.", "a {} drawing."]
    # explicit files win
    mine = tmp_path / "mine.txt"
    mine.write_text("a {c}\n")
    assert resolve_eval_data(str(out), templates=mine).templates == ["a {}"]


def test_our_shard_folder_and_urls_resolve(synth, tmp_path):
    ds = resolve_eval_data(str(synth))
    assert ds.layout == "folder"
    assert ds.urls.split("::") == [str(p) for p in sorted(synth.glob("*.tar"))]
    assert ds.templates == list(TEMPLATES)
    ds = resolve_eval_data(f"{synth}/shard-000000.tar")
    assert ds.classnames == synth / "classnames.txt"
    bare = tmp_path / "bare"
    _shard(bare / "a.tar", [{"__key__": "k0", "jpg": _jpg(), "txt": b"red", "cls": b"0"}])
    with pytest.raises(FileNotFoundError, match="pass --classnames FILE or put classnames.txt"):
        resolve_eval_data(str(bare / "a.tar"))
    ds = resolve_eval_data(str(bare / "a.tar"), classnames=synth / "classnames.txt")
    assert ds.templates is None  # the built-in prompts
    (bare / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(ValueError, match="says 'retrieval'"):
        resolve_eval_data(str(bare), classnames=synth / "classnames.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        resolve_eval_data(str(tmp_path / "empty"))


def test_caption_less_sets_are_refused_by_name(synth, tmp_path):
    """clip_benchmark_export_wds writes image + .cls only: refused up front, not read as zero samples."""
    out = tmp_path / "cb"
    shard = _shard(tmp_path / "src" / "0.tar", [{"__key__": "s0000000", "webp": _jpg(), "cls": b"3"}])
    layout_for_clip_benchmark([shard], out, CLASSNAMES)
    with pytest.raises(ValueError, match="sample 's0000000' has no .txt caption"):
        resolve_eval_data(str(out))


def test_nshards_promising_a_missing_shard_is_named(synth, tmp_path):
    out = tmp_path / "cb"
    layout_for_clip_benchmark([f"{synth}/shard-000000.tar", f"{synth}/shard-000001.tar"], out, CLASSNAMES)
    (out / "test" / "1.tar").unlink()
    with pytest.raises(FileNotFoundError, match="says 2 shards, but .*1.tar is missing"):
        resolve_eval_data(str(out))


@pytest.mark.parametrize("sample,message", [
    ({"__key__": "a", "jpg": _jpg(), "txt": b"x"}, "no sample has a .cls label"),
    ({"__key__": "a", "gif": b"GIF89a", "cls": b"0"}, "sample 'a' has no image CLIP_benchmark reads"),
    ({"__key__": "a", "jpg": _jpg(), "cls": b"32"}, "has .cls 32, outside the 32 class names"),
    ({"__key__": "a", "jpg": _jpg(), "cls": b"red"}, "has a .cls that is not an integer"),
])
def test_bad_shards_are_named_and_leave_no_output(synth, tmp_path, sample, message):
    bad = _shard(tmp_path / "bad.tar", [sample])
    out = tmp_path / "cb"
    with pytest.raises(ValueError, match=message):
        layout_for_clip_benchmark([f"{synth}/shard-000000.tar", bad], out, CLASSNAMES)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.tar"]  # no staging left


def test_a_sample_without_label_among_labelled_ones_is_named(synth, tmp_path):
    bad = _shard(tmp_path / "bad.tar", [{"__key__": "a", "jpg": _jpg(), "cls": b"1"},
                                        {"__key__": "b", "jpg": _jpg(), "txt": b"x"}])
    with pytest.raises(ValueError, match="sample 'b' has no .cls label"):
        layout_for_clip_benchmark([bad], tmp_path / "cb", CLASSNAMES)
    with tarfile.open(bad) as t:  # the shard itself is untouched
        assert len(t.getnames()) == 4


def test_cli(synth, tmp_path, capsys):
    out = tmp_path / "cb"
    assert main(["data", "clip-benchmark", f"{synth}/shard-{{000000..000002}}.tar", str(out)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["shards"] == 3 and s["classes"] == len(CLASSNAMES)
    assert (out / TEMPLATES_FILE).read_text().splitlines() == list(EVAL_TEMPLATES)
    assert main(["data", "clip-benchmark", f"{synth}/shard-000000.tar", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bare = _shard(tmp_path / "bare" / "a.tar", [{"__key__": "k", "jpg": _jpg(), "cls": b"0"}])
    assert main(["data", "clip-benchmark", bare, str(tmp_path / "cb2")]) == 2
    assert "no class names; pass --classnames FILE" in capsys.readouterr().err
    assert not (tmp_path / "cb2").exists()
