"""Starting pretraining from an existing CLIP: a randomly initialised transformers.CLIPModel saved as the
library does -> `pretrain convert --from hf` -> `pretrain train --init-from` (real DeepSpeed ZeRO-3).

With lr=1e-30 (updates far below an ulp) the run's final weights must be the imported ones (towers as
imported, decoder/MLM head as freshly initialised by the import), so the import really reached the
engine's partitioned parameters and master weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import pretrain_cli, run_pretrain

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_hf_import_then_train_init_from(tmp_path: Path):
    from safetensors.torch import load_file

    from data_pipelines.synth import write_synthetic_shards
    from data_pipelines.tokenizer import EOS_ID, PAD_ID, SOS_ID, train_tokenizer_from_shards
    from pretrain.checkpoint.sources import open_source

    shards = write_synthetic_shards(tmp_path / "data", samples=64, samples_per_shard=32, image_size=32,
                                    seed=0)
    tok = train_tokenizer_from_shards(shards["urls"], 128, 500)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu", pad_token_id=PAD_ID,
                bos_token_id=SOS_ID, eos_token_id=EOS_ID)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="gelu")
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=16))
    hf.save_pretrained(tmp_path / "hf")

    init = tmp_path / "init"
    r = pretrain_cli("convert", "--from", "hf", str(tmp_path / "hf"), str(init), "--tokenizer",
             str(tmp_path / "tokenizer.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["fresh"] == ["decoder", "mlm_head"]
    imported = load_file(str(init / "model.safetensors"))

    run = tmp_path / "run"
    args = ["train", "--config", str(init / "train.yaml"), "--init-from", str(init), f"run.dir={run}",
            f"data.train={shards['urls']}", "data.workers=1", "train.micro_batch=8", "train.steps=2",
            "train.precision=fp32", "optim.lr=1e-30", "logging.progress=false",
            "logging.tensorboard=false", "parallel.zero_stage=3"]
    r = run_pretrain(args, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trained = open_source(run).state_dict()
    assert set(trained) == set(imported)
    for k, v in imported.items():
        assert torch.allclose(trained[k], v.float(), rtol=0, atol=1e-20), k  # lr 1e-30: below any ulp

    # a mismatching model config is refused before training starts, naming the fix
    bad = [a if not a.startswith("run.dir=") else f"run.dir={tmp_path / 'bad'}" for a in args]
    r = run_pretrain([*bad, "model.vision.layers=2"], timeout=300)
    assert r.returncode != 0 and "--init-from" in r.stderr and "model config differs" in r.stderr
