"""Export to / import from a Hugging Face `transformers` CLIP folder (`CLIPModel`).

Our towers are HF CLIP's architecture exactly: the only differences are parameter names, the fused QKV
(ours one linear with rows [heads, 3, head_dim], HF's three q/k/v linears), the projections (ours
`x @ P` with P [W, E], HF's `nn.Linear` with weight P^T) and the logit scale's shape ([1] vs []).

Loading an export (no network needed)::

    import torch, transformers
    model = transformers.CLIPModel.from_pretrained("EXPORT_DIR")
    tok = transformers.AutoTokenizer.from_pretrained("EXPORT_DIR")
    proc = transformers.CLIPImageProcessor.from_pretrained("EXPORT_DIR")
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    pixels = proc(images=images, return_tensors="pt").pixel_values
    out = model(input_ids=ids, pixel_values=pixels)  # .text_embeds, .image_embeds: projected, L2-normalised
    # one tower alone: transformers 5 returns an output object; .pooler_output is the projected embedding
    txt = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)

Text pooling: HF pools at the first `text_config.eos_token_id` in each row (any id but the legacy 2);
our tower pools at the first [EOS], whose id our tokenizer fixes at 3, so the exported config says
`eos_token_id: 3` and both pool at the same position for every row our tokenizer produces. With OpenAI
CLIP's tokenizer (`data.tokenizer=clip`) the export is a stock CLIP folder: vocab.json + merges.txt for
`CLIPTokenizer`/`CLIPProcessor`, 49,408 embedding rows, `eos_token_id: 49407` (the first <|endoftext|>,
where our argmax pooling lands too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipelines.clip_tokenizer import EOT_ID, SOT_ID
from data_pipelines.tokenizer import EOS_ID, PAD_ID, SOS_ID
from pretrain.config import Config
from pretrain.export.common import (
    LAYER_NORM_EPS,
    check_source_shapes,
    check_state_matches_config,
    load_weight_file,
    read_json,
    verify_own_export,
    write_hf_tokenizer_files,
    write_json,
    write_safetensors,
)
from pretrain.export.tokenizers import (
    CLIP_POOL_IDS,
    check_tokenizer,
    export_rows,
    is_clip,
    tokenizer_in_folder,
)
from pretrain.models.transformer import fused_qkv_to_stacked, stacked_to_fused_qkv

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Single-file weight names `from_pretrained` looks for, preferred first (sharded: their `.index.json`)."""

BICUBIC = 3
"""PIL's bicubic resampling code, what our eval transform resizes with."""

# (ours, theirs, transposed) outside the blocks
_TOP: tuple[tuple[str, str, bool], ...] = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", False),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", False),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", False),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", False),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", False),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", False),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", False),
    ("visual.proj", "visual_projection.weight", True),
    ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight", False),
    ("text.positional_embedding", "text_model.embeddings.position_embedding.weight", False),
    ("text.ln_final.weight", "text_model.final_layer_norm.weight", False),
    ("text.ln_final.bias", "text_model.final_layer_norm.bias", False),
    ("text.text_projection", "text_projection.weight", True),
)
# (ours, theirs) inside each block, one to one
_BLOCK: tuple[tuple[str, str], ...] = (
    ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
)
_TOWERS = (("visual", "vision_model"), ("text", "text_model"))


def _blocks(layers: dict[str, int]) -> Iterator[tuple[str, str]]:
    """(our block prefix, HF block prefix) for every block of both towers."""
    for ours, theirs in _TOWERS:
        for i in range(layers[ours]):
            yield f"{ours}.transformer.resblocks.{i}.", f"{theirs}.encoder.layers.{i}."


def to_hf_state_dict(state: dict[str, torch.Tensor], layers: dict[str, int], heads: dict[str, int]
                     ) -> dict[str, torch.Tensor]:
    """HF `CLIPModel` state dict of our CLIP towers; `layers`/`heads` are keyed by "visual" and "text"."""
    out = {theirs: state[ours].T if t else state[ours] for ours, theirs, t in _TOP}
    out["logit_scale"] = state["logit_scale"].reshape(())
    for ours, theirs in _blocks(layers):
        tower_heads = heads[ours.split(".")[0]]
        for kind in ("weight", "bias"):
            q, k, v = fused_qkv_to_stacked(state[f"{ours}attn.qkv.{kind}"], tower_heads).chunk(3, dim=0)
            out.update({f"{theirs}self_attn.q_proj.{kind}": q, f"{theirs}self_attn.k_proj.{kind}": k,
                        f"{theirs}self_attn.v_proj.{kind}": v})
            for a, b in _BLOCK:
                out[f"{theirs}{b}.{kind}"] = state[f"{ours}{a}.{kind}"]
    return out


def _attention_shapes(layers: dict[str, int], widths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """HF's q/k/v projection shapes ([W, W] and [W]) that config.json implies, checked before they are
    concatenated and reshaped into our fused QKV."""
    out: dict[str, tuple[int, ...]] = {}
    for ours, theirs in _blocks(layers):
        w = int(widths[ours.split(".")[0]])
        for p in "qkv":
            out[f"{theirs}self_attn.{p}_proj.weight"] = (w, w)
            out[f"{theirs}self_attn.{p}_proj.bias"] = (w,)
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], layers: dict[str, int], heads: dict[str, int]
                       ) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`. Every HF key must be consumed (position_ids buffers aside), so a
    checkpoint with parts we would silently drop fails instead."""
    left = {k: v for k, v in hf.items() if not k.endswith("embeddings.position_ids")}

    def take(key: str) -> torch.Tensor:
        if key not in left:
            raise ValueError(f"HF checkpoint has no {key!r}: not a CLIPModel with the configured layers")
        return left.pop(key)

    out = {ours: take(theirs).T if t else take(theirs) for ours, theirs, t in _TOP}
    out["logit_scale"] = take("logit_scale").reshape(1)
    for ours, theirs in _blocks(layers):
        tower_heads = heads[ours.split(".")[0]]
        for kind in ("weight", "bias"):
            qkv = torch.cat([take(f"{theirs}self_attn.{p}_proj.{kind}") for p in "qkv"], dim=0)
            out[f"{ours}attn.qkv.{kind}"] = stacked_to_fused_qkv(qkv, tower_heads)
            for a, b in _BLOCK:
                out[f"{ours}{a}.{kind}"] = take(f"{theirs}{b}.{kind}")
    if left:
        raise ValueError(f"HF checkpoint has weights our model has no place for: {sorted(left)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- export
def hf_config(cfg: Config, vocab_rows: int, logit_scale: float, dtype: torch.dtype,
              clip_tokenizer: bool = False) -> dict[str, Any]:
    """config.json of a `CLIPConfig` equal to our architecture (eps, activation, pooling ids included;
    with OpenAI CLIP's tokenizer its ids: HF pools at the first <|endoftext|> = 49407, our argmax)."""
    m = cfg.model
    pad, bos, eos = (EOT_ID, SOT_ID, EOT_ID) if clip_tokenizer else (PAD_ID, SOS_ID, EOS_ID)
    common = {"hidden_act": m.activation, "layer_norm_eps": LAYER_NORM_EPS, "projection_dim": m.embed_dim,
              "attention_dropout": 0.0}
    text = {"model_type": "clip_text_model", "vocab_size": vocab_rows, "hidden_size": m.text.width,
            "intermediate_size": int(m.text.width * m.mlp_ratio), "num_hidden_layers": m.text.layers,
            "num_attention_heads": m.text.heads, "max_position_embeddings": m.text.context_length,
            "pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos, **common}
    vision = {"model_type": "clip_vision_model", "hidden_size": m.vision.width,
              "intermediate_size": int(m.vision.width * m.mlp_ratio), "num_hidden_layers": m.vision.layers,
              "num_attention_heads": m.vision.heads, "image_size": m.image_size,
              "patch_size": m.vision.patch_size, "num_channels": 3, **common}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": m.embed_dim,
            "logit_scale_init_value": logit_scale, "dtype": str(dtype).removeprefix("torch."),
            "text_config": text, "vision_config": vision}


def preprocessor_config(cfg: Config) -> dict[str, Any]:
    """`CLIPImageProcessor` settings of our eval transform: shorter side to image_size (bicubic), centre
    crop, scale to [0, 1], normalise with data.mean/std."""
    s = cfg.model.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": BICUBIC, "do_center_crop": True, "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std), "do_convert_rgb": True}


def export_hf(state: dict[str, torch.Tensor], cfg: Config, tokenizer_json: str, out: Path,
              dtype: torch.dtype = torch.float32) -> None:
    """Write a `transformers.CLIPModel` folder from our single-device state dict into the existing `out`.

    Files: model.safetensors (tensors in `dtype`), config.json, tokenizer.json + tokenizer_config.json +
    special_tokens_map.json (a fast tokenizer giving our ids) and preprocessor_config.json. Only the CLIP
    towers and the logit scale are exported: the MAE decoder, the MLM head and a SigLIP logit bias have no
    place in `CLIPModel`. Load with `CLIPModel.from_pretrained(out)` (module docstring).
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"export folder {out} does not exist")
    check_state_matches_config(state, cfg)
    state = {k: v.detach() for k, v in state.items()}  # live parameters in-process: no autograd
    m = cfg.model
    layers = {"visual": m.vision.layers, "text": m.text.layers}
    heads = {"visual": m.vision.heads, "text": m.text.heads}
    state = export_rows(state, tokenizer_json)  # OpenAI CLIP's tokenizer: its 49,408 rows
    vocab_rows = state["text.token_embedding.weight"].shape[0]
    write_hf_tokenizer_files(out, tokenizer_json, m.text.context_length)
    write_safetensors(to_hf_state_dict(state, layers, heads), out / "model.safetensors", dtype)
    scale = float(state["logit_scale"].reshape(()))
    write_json(out / "config.json", hf_config(cfg, vocab_rows, scale, dtype, is_clip(tokenizer_json)))
    write_json(out / "preprocessor_config.json", preprocessor_config(cfg))


# ---------------------------------------------------------------------------------------------- import
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
"""`CLIPTextConfig` / `CLIPVisionConfig` defaults: config.json files saved by transformers omit fields
left at their default, so reading one without transformers needs them."""


def _sub_config(config: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`text_config`/`vision_config` over the defaults; an older hub config's `*_config_dict` wins, as it
    does in transformers' `CLIPConfig`."""
    return {**defaults, **(config.get(key) or {}), **(config.get(f"{key}_dict") or {})}


def _square(value: Any, name: str, src: Path) -> int:
    """image_size / patch_size as one int (a square pair is accepted)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{src}: non-square {name} {value} is not supported (our towers are square)")
        value = value[0]
    return int(value)


def _check_supported(text: dict[str, Any], vision: dict[str, Any], src: Path) -> None:
    """Raise a ValueError naming each HF setting our towers cannot reproduce."""
    problems = []
    for name, sub in (("text_config", text), ("vision_config", vision)):
        if sub["hidden_act"] not in ("gelu", "quick_gelu"):
            problems.append(f"{name}.hidden_act {sub['hidden_act']!r} (we have gelu and quick_gelu)")
        if abs(float(sub["layer_norm_eps"]) - LAYER_NORM_EPS) > 1e-12:
            problems.append(f"{name}.layer_norm_eps {sub['layer_norm_eps']} (ours is {LAYER_NORM_EPS})")
    if text["hidden_act"] != vision["hidden_act"]:
        problems.append(f"different activations per tower ({text['hidden_act']} vs {vision['hidden_act']}); "
                        f"model.activation is shared")
    t_mlp, v_mlp = text["intermediate_size"], vision["intermediate_size"]
    if t_mlp * vision["hidden_size"] != v_mlp * text["hidden_size"]:
        problems.append(f"different MLP ratios per tower (text {t_mlp}/{text['hidden_size']}, vision "
                        f"{v_mlp}/{vision['hidden_size']}); model.mlp_ratio is shared")
    if vision["num_channels"] != 3:
        problems.append(f"vision_config.num_channels {vision['num_channels']} (we read RGB)")
    if text["eos_token_id"] not in (EOS_ID, *CLIP_POOL_IDS):
        problems.append(f"text_config.eos_token_id {text['eos_token_id']}: HF pools there (at the highest id "
                        f"when it is 2), our text tower pools at the first [EOS] of our tokenizer (id "
                        f"{EOS_ID}) or, with OpenAI CLIP's tokenizer, at argmax (2 or {EOT_ID})")
    if problems:
        raise ValueError(f"{src}: unsupported CLIP config: " + "; ".join(problems))


def _overrides(config: dict[str, Any], text: dict[str, Any], vision: dict[str, Any], src: Path
               ) -> dict[str, Any]:
    image_size, patch = _square(vision["image_size"], "image_size", src), _square(vision["patch_size"],
                                                                                  "patch_size", src)
    if image_size % patch:
        raise ValueError(f"{src}: image_size {image_size} is not a multiple of patch_size {patch}")
    out: dict[str, Any] = {
        "model.image_size": image_size,
        "model.embed_dim": int(config.get("projection_dim", 512)),
        "model.mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
        "model.activation": vision["hidden_act"],
        "model.vision.patch_size": patch,
        "model.vision.width": vision["hidden_size"],
        "model.vision.layers": vision["num_hidden_layers"],
        "model.vision.heads": vision["num_attention_heads"],
        "model.text.width": text["hidden_size"],
        "model.text.layers": text["num_hidden_layers"],
        "model.text.heads": text["num_attention_heads"],
        "model.text.context_length": text["max_position_embeddings"],
    }
    for name, sub in (("text_config", text), ("vision_config", vision)):
        if int(sub["hidden_size"] * out["model.mlp_ratio"]) != sub["intermediate_size"]:
            raise ValueError(f"{src}: {name}.intermediate_size {sub['intermediate_size']} is not "
                             f"int(hidden_size x model.mlp_ratio {out['model.mlp_ratio']})")
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        proc = read_json(pre)
        if "image_mean" in proc and "image_std" in proc:
            out["data.mean"] = [float(x) for x in proc["image_mean"]]
            out["data.std"] = [float(x) for x in proc["image_std"]]
    return out


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF folder: model.safetensors, pytorch_model.bin (weights_only) or either's
    sharded form (`*.index.json` naming the shards)."""
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return load_weight_file(src / name)
        index = src / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_weight_file(src / shard))
            return state
    raise FileNotFoundError(f"{src}: no {' or '.join(WEIGHT_FILES)} (or sharded index) found")


def import_hf(src: Path, tokenizer_json: str | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """Read an HF CLIP folder: (our-named fp32 state dict of the CLIP towers and logit scale, dotted config
    overrides that make `PretrainModel` match it, tokenizer record or None).

    The tokenizer is `tokenizer_json` if given, else the folder's (ours, or OpenAI CLIP's vocab.json +
    merges.txt), else OpenAI CLIP's when the config pools as CLIP does (`eos_token_id` 2 or 49407: the
    hub's openai/clip-vit-* and LAION folders). A tokenizer that does not fit (size, pooling token) is
    refused naming both (`pretrain.export.tokenizers.check_tokenizer`).

    Load the state with `load_state_dict(state, strict=False)`: the decoder and MLM head are not in an HF
    CLIP checkpoint and keep their fresh initialisation. Raises ValueError naming the setting when the
    folder holds something our towers cannot express (other activations or norms, per-tower MLP ratios,
    pooling at another token id).
    """
    src = Path(src)
    verify_own_export(src)  # our own export: its manifest must hold
    config = read_json(src / "config.json")
    if config.get("model_type", "clip") != "clip":
        raise ValueError(f"{src}: model_type {config.get('model_type')!r} is not 'clip' (a CLIPModel folder)")
    text = _sub_config(config, "text_config", _TEXT_DEFAULTS)
    vision = _sub_config(config, "vision_config", _VISION_DEFAULTS)
    _check_supported(text, vision, src)
    overrides = _overrides(config, text, vision, src)
    if tokenizer_json is None:
        tokenizer_json = tokenizer_in_folder(src)
    tokenizer_json, vocab = check_tokenizer(int(text["vocab_size"]), tokenizer_json,
                                            text["eos_token_id"] in CLIP_POOL_IDS,
                                            f"{src} (text_config.eos_token_id {text['eos_token_id']})")
    overrides.update(vocab)
    layers = {"visual": vision["num_hidden_layers"], "text": text["num_hidden_layers"]}
    heads = {"visual": vision["num_attention_heads"], "text": text["num_attention_heads"]}
    weights = read_hf_weights(src)
    widths = {"visual": vision["hidden_size"], "text": text["hidden_size"]}
    check_source_shapes(weights, _attention_shapes(layers, widths), str(src), f"{src / 'config.json'}")
    state = from_hf_state_dict(weights, layers, heads)
    return {k: v.float() for k, v in state.items()}, overrides, tokenizer_json
