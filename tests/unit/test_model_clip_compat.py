"""The towers are exactly HF `CLIPModel`'s architecture: copying the weights over with the exporter's
mapping (`pretrain.export.hf.to_hf_state_dict`: fused QKV reordered with `fused_qkv_to_stacked`, projections
transposed) gives the same unnormalised image and text features. Whole export folders (config, tokenizer,
from_pretrained) are tested in tests/test_export_hf.py.

Skipped where `transformers` is not installed.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import DecoderConfig, ModelConfig, ObjectivesConfig, TextConfig, VisionConfig
from pretrain.export import hf as hf_export
from pretrain.models import PretrainModel

transformers = pytest.importorskip("transformers")

EOS = 3


def to_hf_state_dict(model: PretrainModel) -> dict[str, torch.Tensor]:
    """The exporter's mapping (`pretrain.export.hf.to_hf_state_dict`) applied to a live model."""
    v, t = model.visual, model.text
    return hf_export.to_hf_state_dict(model.state_dict(), {"visual": len(v.transformer.resblocks),
                                                           "text": len(t.transformer.resblocks)},
                                      {"visual": v.transformer.heads, "text": t.transformer.heads})


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_embeddings_match_hf_clip(act):
    torch.manual_seed(0)
    m = ModelConfig(image_size=32, embed_dim=24, activation=act, vocab_pad_multiple=64,
                    vision=VisionConfig(patch_size=8, width=32, layers=2, heads=4),
                    text=TextConfig(width=32, layers=2, heads=4, context_length=12),
                    decoder=DecoderConfig(width=16, layers=1, heads=2))
    model = PretrainModel(m, ObjectivesConfig(), vocab_size=100, eos_id=EOS).eval()
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=model.vocab_size, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                         hidden_act=act, eos_token_id=EOS, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24)
    hf = transformers.CLIPModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(4, 100, (3, 12), generator=gen)
    ids[:, 0] = 1
    for b, e in enumerate((4, 7, 11)):
        ids[b, e], ids[b, e + 1:] = EOS, 0
    with torch.no_grad():
        hf_img = hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)
        hf_txt = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
        torch.testing.assert_close(model.visual(images), hf_img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.text(ids), hf_txt, rtol=1e-4, atol=1e-5)
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())
