"""The weight-decay split (`optim.weight_decay`: "not applied to biases, norms, embeddings, logit scale"):
every token, class and position table of every tower -- the fusion encoder's text positions included, whose
name (`fusion.text_pos`) has neither "embedding" nor "token" in it -- is exempt, and every other parameter
stays in the group it had before the exemption became explicit. Meta-device models, one process."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY

from parallel.param_groups import param_groups
from pretrain.config import load_config
from pretrain.models.pretrain_model import PretrainModel

EVERY_OPTION = ["model.fusion.layers=1", "model.fusion.heads=2", "model.fusion.text_positions=true",
                "model.fusion.image_positions=true", "objectives.itm.weight=1",
                "objectives.contrastive.loss=siglip"]
# name markers of the parameters the README exempts (norms are matched by their module names: ln_*, *norm*)
EXEMPT_MARKERS = ("embedding", "positional", "_pos", "token", "ln_", "norm", "logit_scale", "logit_bias",
                  "mask_token")


def model_for(*overrides: str) -> PretrainModel:
    cfg = load_config(None, [*TINY, *overrides])
    with torch.device("meta"):
        return PretrainModel.from_config(cfg)


def no_decay_names(model: torch.nn.Module, groups: list[dict]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for g in groups for p in g["params"]]
    assert len(names) == len(set(names)) == len(by_id)  # every parameter in exactly one group
    return {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}


def legacy_exempt(name: str, prm: torch.Tensor) -> bool:
    """The name rule before the exemption became explicit (all but `fusion.text_pos` keep its verdict)."""
    return (prm.ndim < 2 or "embedding" in name or "logit_scale" in name or "token" in name
            or name.endswith(".bias"))


@pytest.mark.parametrize("lr_mult", [None, {"fusion.*": 0.5}])
def test_every_embedding_norm_bias_and_scale_is_exempt_with_a_fusion_encoder(lr_mult):
    model = model_for(*EVERY_OPTION)
    names = dict(model.named_parameters())
    assert {"fusion.text_pos", "fusion.image_pos.embedding", "logit_bias", "decoder.mask_token"} <= set(names)
    exempt = no_decay_names(model, param_groups(model, 0.1, 1e-3, lr_mult))
    marked = {n for n in names if n.endswith(".bias") or any(m in n for m in EXEMPT_MARKERS)}
    assert marked - exempt == set()  # fusion.text_pos was decayed here
    assert "fusion.text_pos" in exempt
    # everything else exactly as before: only fusion.text_pos changed group
    before = {n for n, p in names.items() if legacy_exempt(n, p)}
    assert exempt ^ before == {"fusion.text_pos"}
    # and the matrices still decay (projections, conv/patch embedding, attention, MLP, heads)
    assert {"visual.proj", "text.text_projection", "fusion.text_in.weight",
            "decoder.decoder_embed.weight"} <= set(names) - exempt


def test_an_embedding_module_is_exempt_whatever_its_name():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.words = torch.nn.Embedding(10, 4)
            self.mix = torch.nn.Linear(4, 4)

    model = Tiny()
    assert no_decay_names(model, param_groups(model, 0.1)) == {"mix.bias", "words.weight"}
