"""Review round 3 (evalsuite), the suspected ones: a rerun of `pretrain eval --suite` into the same `--out`
removes what the earlier suite wrote and this one does not rewrite (and nothing else); the binding probe
keeps two shards' metadata apart when their sample keys repeat (per-shard numbering); a CLIP_benchmark
split folder without nshards.txt is read in numeric shard order (0, 1, 2, .., 10), as nshards.txt gives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import webdataset as wds
from PIL import Image
from tiny import fake_run

from pretrain.evaluation import evaluate as evaluate_module
from pretrain.evaluation import suite as suite_module
from pretrain.evaluation.binding import binding_probe, read_metadata, read_shard_metadata
from pretrain.evaluation.layout import EvalData, resolve_eval_data
from pretrain.evaluation.suite import INDEX_FILE, Suite, SuiteDataset, run_suite


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path: Path, samples: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return str(path)


# -- 1. suite reruns into the same --out ---------------------------------------------------------------


@pytest.fixture
def fake_eval(monkeypatch):
    """No model: load_model gives a marker and every dataset scores 0.5 on every metric."""
    monkeypatch.setattr(evaluate_module, "load_model", lambda ckpt, tag=None: (ckpt, tag))
    metrics = [m for ms in suite_module.TASK_METRICS.values() for m in ms]
    monkeypatch.setattr(suite_module, "evaluate_dataset",
                        lambda bundle, d, batch: {"samples": 4, **dict.fromkeys(metrics, 0.5)})


def _suite(checkpoints: list[str], plot: list[str]) -> Suite:
    data = EvalData(urls="unused.tar", classnames=Path("unused.txt"), templates=None, templates_file=None,
                    layout="urls")
    return Suite([SuiteDataset("shapes", data, ("zeroshot", "retrieval"))], checkpoints, plot)


def test_suite_rerun_removes_only_what_the_earlier_suite_wrote(tmp_path, fake_eval):
    a, old = fake_run(tmp_path / "a", [2]), fake_run(tmp_path / "old", [2])
    out = tmp_path / "ev"
    logged: list[str] = []
    first = run_suite(_suite([a, old], ["zeroshot_top1"]), out, log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a.json", "a.md", "old.json", "old.md", "comparison.md", "zeroshot_top1.json", "zeroshot_top1.png",
         INDEX_FILE])
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["files"]) == sorted(Path(f).name for f in first["files"])
    assert first["removed"] == []
    # the user's own files, an output they edited, and a forged entry pointing out of --out stay
    (out / "notes.txt").write_text("mine\n")
    (out / "old.md").write_text("# old\n\nmy annotations\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("not the suite's\n")
    index["files"]["../victim.txt"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    index["files"]["sub"] = "0" * 64
    (out / "sub").mkdir()
    (out / INDEX_FILE).write_text(json.dumps(index))

    second = run_suite(_suite([a], ["i2t_r1"]), out, log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a.json", "a.md", "comparison.md", "i2t_r1.json", "i2t_r1.png", INDEX_FILE, "notes.txt", "old.md",
         "sub"])
    assert sorted(Path(f).name for f in second["removed"]) == ["old.json", "zeroshot_top1.json",
                                                                 "zeroshot_top1.png"]
    assert victim.is_file() and (out / "old.md").read_text().endswith("my annotations\n")
    assert "| a |" in (out / "comparison.md").read_text() and "old" not in (out / "comparison.md").read_text()
    note = "\n".join(logged)
    assert "old.md" in note and "changed since" in note  # said why it stayed
    assert sorted(json.loads((out / INDEX_FILE).read_text())["files"]) == [
        "a.json", "a.md", "comparison.md", "i2t_r1.json", "i2t_r1.png"]


def test_suite_without_an_earlier_index_deletes_nothing_and_says_what_is_left(tmp_path, fake_eval):
    a = fake_run(tmp_path / "a", [2])
    out = tmp_path / "ev"
    out.mkdir()
    (out / "b.json").write_text("{}")  # e.g. a suite run before the index existed
    (out / INDEX_FILE).write_text("not json")
    logged: list[str] = []
    result = run_suite(_suite([a], []), out, log=logged.append)
    assert result["removed"] == [] and (out / "b.json").read_text() == "{}"
    note = "\n".join(logged)
    assert INDEX_FILE in note and "b.json" in note
    assert sorted(json.loads((out / INDEX_FILE).read_text())["files"]) == ["a.json", "a.md", "comparison.md"]


def test_a_checkpoint_named_like_the_index_gets_another_label(tmp_path, fake_eval):
    c = fake_run(tmp_path / Path(INDEX_FILE).stem, [1])
    run_suite(_suite([c], []), tmp_path / "ev", log=lambda m: None)
    index = json.loads((tmp_path / "ev" / INDEX_FILE).read_text())
    assert f"{Path(INDEX_FILE).stem}-2.json" in index["files"]


# -- 2. binding metadata of two shards with the same keys ---------------------------------------------


class _Tok:
    """Records every caption list it encodes; ids: the caption's length, then zeros."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode_batch(self, texts: list[str], length: int) -> torch.Tensor:
        self.seen += texts
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        ids[:, 0] = torch.tensor([len(t) for t in texts])
        return ids


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(images), 1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, :1].float()


def _binding_shards(folder: Path) -> tuple[str, list[str]]:
    """Two shards numbering their samples from 0 each: the same keys, different captions and swaps."""
    urls, captions = [], []
    for s in range(2):
        samples = []
        for k in range(3):
            caption = f"shard {s} sample {k} caption"
            meta = {"swapped_colours": f"colours of {caption}", "swapped_objects": f"objects of {caption}"}
            samples.append({"__key__": f"{k:06d}", "jpg": _jpg(), "txt": caption.encode(),
                            "json": json.dumps(meta).encode()})
            captions.append(caption)
        urls.append(_shard(folder / f"{s}.tar", samples))
    return "::".join(urls), captions


def test_binding_keeps_shards_with_the_same_keys_apart(tmp_path):
    urls, captions = _binding_shards(tmp_path)
    meta = read_shard_metadata(urls)
    assert len(meta) == 6
    first, second = urls.split("::")
    assert meta[(first, "000001")]["swapped_colours"] == "colours of shard 0 sample 1 caption"
    assert meta[(second, "000001")]["swapped_colours"] == "colours of shard 1 sample 1 caption"
    with pytest.raises(ValueError, match="000000.*both|both.*000000"):
        read_metadata(urls)  # the by-key view refuses what it cannot tell apart, naming the key

    cfg = SimpleNamespace(model=SimpleNamespace(text=SimpleNamespace(context_length=8), image_size=8),
                          data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                               max_sample_bytes=0),
                          objectives=SimpleNamespace(mlm=SimpleNamespace(conditioned=False)))
    tok = _Tok()
    out = binding_probe(_Model(), tok, cfg, urls, batch_size=4)
    assert out["binding_samples"] == 6
    swaps = sorted(t for t in tok.seen if t.startswith(("colours of", "objects of")))
    assert swaps == sorted(f"{kind} of {c}" for c in captions for kind in ("colours", "objects"))


# -- 3. shard order without nshards.txt -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["split", "folder"])
def test_shards_without_nshards_are_read_in_numeric_order(tmp_path, where):
    root = tmp_path / "cb"
    folder = root / "test" if where == "split" else root
    for i in range(12):
        sample = {"__key__": f"s{i}", "jpg": _jpg(), "txt": b"a red circle", "cls": b"0"}
        _shard(folder / f"{i}.tar", [sample])
    (root / "classnames.txt").write_text("red circle\n")
    got = resolve_eval_data(str(root)).urls.split("::")
    assert [Path(u).name for u in got] == [f"{i}.tar" for i in range(12)]
    (folder / "nshards.txt").write_text("12\n")
    if where == "split":  # what CLIP_benchmark itself reads: {0..11}.tar
        from data_pipelines.urls import expand_urls

        assert expand_urls(resolve_eval_data(str(root)).urls) == got
    with tarfile.open(got[10]) as tar:
        assert tar.getnames()[0].startswith("s10.")
