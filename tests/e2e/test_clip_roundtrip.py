"""Starting from a CLIP checkpoint with OpenAI CLIP's tokenizer, through training, and back out:

a transformers `CLIPModel` folder (random weights, small, CLIP's 49,408-token vocabulary) -> `pretrain
convert --from hf` -> `pretrain train --init-from` 3 steps on 2 ranks (real deepspeed launcher,
`data.tokenizer=clip`, tp=2 under ZeRO-3) -> `pretrain convert --to hf` and `--to open_clip` -> each library
loads its folder with its stock tokenizer (`CLIPProcessor` built from the exported vocab.json/merges.txt;
open_clip's `get_tokenizer`, its own SimpleTokenizer) and gives the embeddings `pretrain embed` gives.

An OpenAI-format state dict (open_clip's `CLIP`, head width 64) goes the same way without the training leg:
`convert --from openai` -> `--to hf` / `--to open_clip` of the import itself, with the same library checks,
and the exported weights must be the source's exactly. Its training leg (tp=1 x dp=2 under ZeRO-1) proved
nothing the HF leg does not: `--init-from` under ZeRO-1 on 2 ranks is checked bit-exact by
tests/e2e/test_fusion_train.py (test_init_from_a_dual_encoder_adds_a_fresh_fusion_encoder[1]), training
with the CLIP tokenizer by the HF leg and test_training_from_scratch_with_the_clip_tokenizer below, and the
exporters read every ZeRO stage through the same checkpoint reader (pretrain/checkpoint/sources.py) that
test reads.

Zero-shot at step 0: a run started from an import begins from exactly the imported weights (init-from is
checked bit-exact by tests/e2e/test_import_train.py), so `pretrain eval` of the import folder is the run's
step-0 evaluation. It must equal the source model's own forward (the library model wrapped as
encode_image/encode_text) under the same `pretrain eval` metric code, data and tokenizer -- for the random
source and for the exported model (its HF export imported again).

Commands run in this process (`pretrain.cli.main`, the CLI's own argument parsing and output) except where
this file is the CLI path of a behaviour: `convert --from openai` and a successful `embed` run as the
`pretrain` program; `convert --from hf` does in tests/e2e/test_import_train.py, `convert --to hf|open_clip`
in tests/e2e/test_fusion_train.py, `eval` in many. Each program start costs ~1.5-3 CPU s of imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import cli_json, pretrain_cli, run_pretrain

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.slow

TEXTS = ["a red circle in the top left", "A BIG blue square!", "green triangle, small", "a photo of a cross",
         "naïve café"]


class LibraryModel:
    """A library CLIP as `pretrain eval` calls models: normalised fp32 embeddings."""

    def __init__(self, image_fn, text_fn) -> None:
        self.image_fn, self.text_fn = image_fn, text_fn

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_fn(images).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_fn(ids).float(), dim=-1)


def _feat(out):
    return getattr(out, "pooler_output", out)


def _hf_wrapper(hf) -> LibraryModel:
    return LibraryModel(lambda x: _feat(hf.get_image_features(pixel_values=x)),
                        lambda ids: _feat(hf.get_text_features(input_ids=ids)))


def _ok(r) -> dict:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _eval_cli(ckpt: Path, val: str, classnames: str) -> dict:
    return cli_json("eval", "--checkpoint", str(ckpt), "--data", val, "--classnames", classnames, "--json")


def _eval_library(model: LibraryModel, ckpt: Path, val: str, classnames: str) -> dict:
    from pretrain.evaluation.evaluate import evaluate, load_model

    _, tok, cfg = load_model(ckpt)  # the import's tokenizer and config: same data, same prompts
    return evaluate(ckpt, val, classnames, model_bundle=(model, tok, cfg))


METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")


def _hf_source(tmp_path: Path) -> tuple[list[str], LibraryModel, torch.Tensor]:
    """A transformers CLIPModel folder as the hub has them (legacy eos_token_id 2: argmax pooling)."""
    from data_pipelines.clip_tokenizer import CLIP_VOCAB_SIZE, SOT_ID

    torch.manual_seed(0)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2,
                bos_token_id=SOT_ID, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    source = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                            projection_dim=16)).eval()
    source.save_pretrained(tmp_path / "source")
    return ["--from", "hf", str(tmp_path / "source")], _hf_wrapper(source), source.text_projection.weight.T


def _openai_source(tmp_path: Path) -> tuple[list[str], LibraryModel, torch.Tensor]:
    """An OpenAI-format state dict (open_clip's `CLIP` has OpenAI's names; head width 64 as OpenAI's)."""
    from data_pipelines.clip_tokenizer import CLIP_VOCAB_SIZE

    torch.manual_seed(0)
    oc = open_clip.model.CLIP(embed_dim=16, quick_gelu=True,
                              vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
                              text_cfg={"context_length": 16, "vocab_size": CLIP_VOCAB_SIZE, "width": 64,
                                        "heads": 1, "layers": 1}).eval()
    torch.save(oc.state_dict(), tmp_path / "ViT-tiny.pt")
    wrapper = LibraryModel(oc.encode_image, oc.encode_text)
    return ["--from", "openai", str(tmp_path / "ViT-tiny.pt")], wrapper, oc.text_projection


@pytest.mark.timeout(900)
@pytest.mark.parametrize("source, train", [("hf", True), ("openai", False)])
def test_clip_import_train_export_loads_with_stock_tokenizers(tmp_path: Path, source: str, train: bool):
    from data_pipelines.clip_tokenizer import CLIP_VOCAB_SIZE, EOT_ID, SOT_ID
    from data_pipelines.synth import write_synthetic_shards

    val = write_synthetic_shards(tmp_path / "val", samples=64, samples_per_shard=64, image_size=32, seed=1)
    classnames = str(Path(val["urls"].split("shard-")[0]) / "classnames.txt")
    make_source = {"hf": _hf_source, "openai": _openai_source}[source]
    convert_from, library_source, source_projection = make_source(tmp_path)

    init = tmp_path / "init"
    if source == "openai":  # the CLI path of `convert --from openai` (of --from hf: test_import_train.py)
        out = _ok(pretrain_cli("convert", *convert_from, str(init)))
    else:
        out = cli_json("convert", *convert_from, str(init))
    assert out["tokenizer"] == "clip" and out["fresh"] == ["decoder", "mlm_head"]
    step0 = _eval_cli(init, val["urls"], classnames)
    library0 = _eval_library(library_source, init, val["urls"], classnames)
    assert {k: step0[k] for k in METRICS} == {k: library0[k] for k in METRICS}
    assert step0["samples"] == 64 and step0["zeroshot_top1"] is not None

    run = init  # without the training leg, the import itself is exported
    if train:
        data = write_synthetic_shards(tmp_path / "train", samples=96, samples_per_shard=48, image_size=32,
                                      seed=0)
        run = tmp_path / "run"
        r = run_pretrain(["train", "--config", str(init / "train.yaml"), "--init-from", str(init),
                          f"run.dir={run}", f"data.train={data['urls']}", "data.workers=1",
                          "train.micro_batch=8", "train.steps=3", "train.precision=fp32",
                          "optim.warmup_steps=2", "logging.progress=false", "logging.tensorboard=false",
                          "parallel.zero_stage=3", "parallel.tp=2", "checkpoint.every=0"],
                         procs=2, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert json.loads((run / "tokenizer.json").read_text())["type"] == "mmpt-clip-bpe"
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 3 and all(np.isfinite(m["loss_mlm"]) for m in metrics)

    for kind in ("hf", "open_clip"):
        cli_json("convert", str(run), str(tmp_path / kind), "--to", kind)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # the model's own size: no resampling differences between the preprocessors
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    embed = ["embed", "--checkpoint", str(run), "--images", str(images), "--texts",
             str(tmp_path / "texts.txt"), "--out", str(tmp_path / "emb.npz")]
    if train:  # the program once: the CLI path of a successful embed
        _ok(pretrain_cli(*embed))
    else:
        cli_json(*embed)
    ours = np.load(tmp_path / "emb.npz")
    pil = [Image.open(images / f"{i}.png").convert("RGB") for i in range(4)]

    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.vocab_size == CLIP_VOCAB_SIZE  # the mask row stays behind, like the MLM head
    if train:
        assert not torch.equal(hf.text_projection.weight.T, source_projection)  # it trained
    else:  # import -> export: the source's weights, exactly
        assert torch.equal(hf.text_projection.weight.T, source_projection)
    proc = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    assert type(proc.tokenizer).__name__.startswith("CLIPTokenizer")
    batch = proc(text=TEXTS, images=pil, padding="max_length", max_length=16, truncation=True,
                 return_tensors="pt")
    assert (batch["input_ids"][:, 0] == SOT_ID).all() and (batch["input_ids"] == EOT_ID).any(dim=1).all()
    with torch.no_grad():
        hf_img = F.normalize(_feat(hf.get_image_features(pixel_values=batch["pixel_values"])), dim=-1)
        hf_txt = F.normalize(_feat(hf.get_text_features(input_ids=batch["input_ids"])), dim=-1)
    assert float((hf_img - torch.from_numpy(ours["image"])).abs().max()) <= 1e-5
    assert float((hf_txt - torch.from_numpy(ours["text"])).abs().max()) <= 1e-5

    oc, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'open_clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'open_clip'}")
    assert type(tokenizer).__name__ == "SimpleTokenizer"
    with torch.no_grad():
        oc_img = oc.eval().encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        oc_txt = oc.encode_text(tokenizer(TEXTS), normalize=True)
    assert float((oc_img - torch.from_numpy(ours["image"])).abs().max()) <= 1e-5
    assert float((oc_txt - torch.from_numpy(ours["text"])).abs().max()) <= 1e-5

    # the exported model as a source: its HF export imported again evaluates as the run and as HF's forward
    again = tmp_path / "again"
    cli_json("convert", "--from", "hf", str(tmp_path / "hf"), str(again))
    exported = _eval_cli(run, val["urls"], classnames) if train else step0  # the import's: done above
    reimported = _eval_cli(again, val["urls"], classnames)
    library = _eval_library(_hf_wrapper(hf), again, val["urls"], classnames)
    picked = [{k: result[k] for k in METRICS} for result in (reimported, library, exported)]
    assert picked[0] == picked[1] == picked[2]


@pytest.mark.timeout(600)
def test_training_from_scratch_with_the_clip_tokenizer(tmp_path: Path):
    """`data.tokenizer=clip` as a first-class choice without an import: planned, trained (MLM on CLIP ids
    with the appended mask row), checkpointed with its tokenizer record, evaluated."""
    from tiny import TINY

    from data_pipelines.synth import write_synthetic_shards

    train = write_synthetic_shards(tmp_path / "train", samples=64, samples_per_shard=32, image_size=32,
                                   seed=0)
    plan = cli_json("plan", "--world", "1", "--json", *TINY, "data.tokenizer=clip")
    assert plan["vocab_padded"] == 49472
    run = tmp_path / "run"
    r = run_pretrain(["train", *TINY, "data.tokenizer=clip", f"data.train={train['urls']}", "data.workers=1",
                      "train.steps=3", f"run.dir={run}", "logging.tensorboard=false"], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads((run / "tokenizer.json").read_text())["type"] == "mmpt-clip-bpe"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and all(np.isfinite(x["loss_mlm"]) for x in rows)
    classnames = str(Path(train["urls"].split("shard-")[0]) / "classnames.txt")
    result = _eval_cli(run, train["urls"], classnames)
    assert result["samples"] == 64 and 0 <= result["zeroshot_top1"] <= 1
