"""`pretrain embed`: embeddings of a real (tiny, one-step) checkpoint equal the model's own encoders on the
same inputs, the .npz has the documented keys and shapes, and bad arguments fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import run_pretrain, train_args, write_micro_shards

from data_pipelines.loader import make_eval_loader
from pretrain.cli import main
from pretrain.evaluation.embed import embed
from pretrain.evaluation.evaluate import load_model

SIZE = 32  # MICRO's model.image_size


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """One optimizer step of the MICRO model on synthetic shards: a real DeepSpeed checkpoint in seconds."""
    d = tmp_path_factory.mktemp("embed")
    shards = write_micro_shards(d / "shards")
    r = run_pretrain(["train", *train_args(shards, d / "run", 1, "data.workers=0")])
    assert r.returncode == 0, r.stderr[-3000:]
    return {"run": d / "run", "shards": f"{d}/shards/shard-{{000000..000001}}.tar"}


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run["run"])


def _assert_normalised(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_data_gives_paired_embeddings_of_the_eval_loader(run, loaded, tmp_path: Path):
    model, tokenizer, cfg = loaded
    out = tmp_path / "emb.npz"
    result = embed(run["run"], out, data=run["shards"], batch_size=16, max_samples=40)
    with np.load(out) as z:  # no pickles: plain arrays only
        assert set(z.files) == {"image", "text", "keys"}
        image, text, keys = z["image"], z["text"], list(z["keys"])
    assert image.shape == text.shape == (40, cfg.model.embed_dim)
    _assert_normalised(image)
    _assert_normalised(text)
    assert np.array_equal(result["image"], image)

    batch = next(iter(make_eval_loader(run["shards"], tokenizer, cfg.model.image_size, 40,
                                       cfg.model.text.context_length, cfg.data.mean, cfg.data.std)))
    assert keys == batch["_keys"]
    np.testing.assert_allclose(image, model.encode_image(batch["image"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(text, model.encode_text(batch["text"]).numpy(), atol=1e-5)


def _write_images(folder: Path, n: int = 5) -> list[np.ndarray]:
    """Lossless SIZE x SIZE images (the eval crop is then the identity), names out of creation order."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]
    for i, arr in enumerate(pixels):
        Image.fromarray(arr).save(folder / f"img{n - 1 - i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return pixels[::-1]  # in sorted file-name order


def test_images_and_texts_equal_the_model_on_the_same_inputs(run, loaded, tmp_path: Path):
    model, tokenizer, cfg = loaded
    pixels = _write_images(tmp_path / "imgs")
    lines = ["a red square", "", "a blue circle on a green background"]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sub" / "emb.npz"
    embed(run["run"], out, images=tmp_path / "imgs", texts=tmp_path / "texts.txt", batch_size=2)
    with np.load(out) as z:
        image, text, keys, texts = z["image"], z["text"], list(z["keys"]), list(z["texts"])
    assert keys == [f"img{i:02d}.png" for i in range(5)] and texts == lines
    assert image.shape == (5, cfg.model.embed_dim) and text.shape == (3, cfg.model.embed_dim)

    # independent of the data pipeline: scale to [0, 1] and normalise by hand
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(image, model.encode_image((x - mean) / std).numpy(), atol=1e-5)
    ids = tokenizer.encode_batch(lines, cfg.model.text.context_length)
    np.testing.assert_allclose(text, model.encode_text(ids).numpy(), atol=1e-5)
    _assert_normalised(image)


def test_cli_images_only(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _write_images(tmp_path / "imgs", n=3)
    out = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(run["run"]), "--images", str(tmp_path / "imgs"),
                 "--out", str(out), "--max-samples", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["image"] == [2, 16] and summary["text"] == [0, 16]
    with np.load(out) as z:
        assert z["image"].shape == (2, 16) and list(z["keys"]) == ["img00.png", "img01.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{missing}", "--images", "{imgs}"], "checkpoint not found"),
    (["--checkpoint", "{run}", "--images", "{empty}"], "no jpg/jpeg/png/webp files"),
    (["--checkpoint", "{run}", "--images", "{missing}"], "no such folder"),
    (["--checkpoint", "{run}", "--data", "x.tar", "--images", "{imgs}"], "not both"),
    (["--checkpoint", "{run}"], "nothing to embed"),
    (["--checkpoint", "{run}", "--texts", "{empty_txt}"], "is empty"),
])
def test_cli_errors_exit_nonzero_naming_the_problem(run, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str], message: str):
    _write_images(tmp_path / "imgs", n=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_txt").write_text("")
    where = {"missing": tmp_path / "nope", "imgs": tmp_path / "imgs", "empty": tmp_path / "empty",
             "run": run["run"], "empty_txt": tmp_path / "empty_txt"}
    argv = ["embed", *[a.format(**where) for a in args], "--out", str(tmp_path / "out.npz")]
    assert main(argv) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_existing_out_is_kept_unless_overwrite(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    texts = tmp_path / "t.txt"
    texts.write_text("a red square\n")
    out = tmp_path / "out.npz"
    out.write_bytes(b"user data")
    assert main(["embed", "--checkpoint", str(run["run"]), "--texts", str(texts), "--out", str(out)]) != 0
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"user data"
    assert main(["embed", "--checkpoint", str(run["run"]), "--texts", str(texts), "--out", str(out),
                 "--overwrite"]) == 0
    assert np.load(out)["text"].shape[0] == 1
