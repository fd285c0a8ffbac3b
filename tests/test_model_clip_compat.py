"""The towers are exactly HF `CLIPModel`'s architecture: copying the weights over (fused QKV reordered with
`fused_qkv_to_stacked`, projections transposed) gives the same image and text embeddings.

Skipped where `transformers` is not installed; the weight mapping here is the reference for the exporter.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import DecoderConfig, ModelConfig, ObjectivesConfig, TextConfig, VisionConfig
from pretrain.models import PretrainModel
from pretrain.models.transformer import fused_qkv_to_stacked

transformers = pytest.importorskip("transformers")

EOS = 3


def _blocks(prefix: str, tower, out: dict[str, torch.Tensor]) -> None:
    heads = tower.transformer.heads
    for i, blk in enumerate(tower.transformer.resblocks):
        p = f"{prefix}.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = fused_qkv_to_stacked(getattr(blk.attn.qkv, kind), heads).chunk(3, dim=0)
            out.update({p + f"self_attn.q_proj.{kind}": q, p + f"self_attn.k_proj.{kind}": k,
                        p + f"self_attn.v_proj.{kind}": v,
                        p + f"self_attn.out_proj.{kind}": getattr(blk.attn.proj, kind),
                        p + f"layer_norm1.{kind}": getattr(blk.ln_1, kind),
                        p + f"layer_norm2.{kind}": getattr(blk.ln_2, kind),
                        p + f"mlp.fc1.{kind}": getattr(blk.mlp.fc1, kind),
                        p + f"mlp.fc2.{kind}": getattr(blk.mlp.fc2, kind)})


def to_hf_state_dict(model: PretrainModel) -> dict[str, torch.Tensor]:
    v, t = model.visual, model.text
    out = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight,
        "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,
        "text_model.embeddings.token_embedding.weight": t.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": t.positional_embedding,
        "text_model.final_layer_norm.weight": t.ln_final.weight,
        "text_model.final_layer_norm.bias": t.ln_final.bias,
        "text_projection.weight": t.text_projection.T,
        "logit_scale": model.logit_scale.reshape(()),
    }
    _blocks("vision_model", v, out)
    _blocks("text_model", t, out)
    return {k: x.detach().clone() for k, x in out.items()}


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
