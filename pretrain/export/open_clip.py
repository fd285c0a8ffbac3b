"""Export to / import from an open_clip folder (`open_clip_config.json` + `open_clip_model.safetensors`).

open_clip's standard `CLIP` class is our architecture: its parameter names are OpenAI CLIP's like ours,
with the text tower at the top level (`token_embedding`, `transformer`, ...) instead of under `text.`,
`nn.MultiheadAttention`'s stacked [3, heads, head_dim] `in_proj_weight` instead of our fused
[heads, 3, head_dim] `qkv`, and `c_fc`/`c_proj`/`out_proj` for `fc1`/`fc2`/`proj`. The exported config pins
what differs from open_clip's defaults: text pooling at the first [EOS] (`pool_type: "eos"`,
`eos_id: 3`; open_clip's default `argmax` would pool at the highest token id), causal mask on, LayerNorm
eps, QuickGELU or GELU, the padded vocabulary and our context length. A run with OpenAI CLIP's tokenizer
(`data.tokenizer=clip`) exports as a stock open_clip CLIP instead: argmax pooling, CLIP's 49,408 rows, no
`hf_tokenizer_name`, so `get_tokenizer` gives open_clip's own SimpleTokenizer.

Loading an export (open_clip 3.x, no network needed)::

    import open_clip
    model, preprocess = open_clip.create_model_from_pretrained("local-dir:EXPORT_DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:EXPORT_DIR")   # our BPE through transformers
    img = model.encode_image(preprocess(pil_image)[None], normalize=True)
    txt = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)

(`open_clip.create_model("local-dir:EXPORT_DIR")` gives the model alone.) The tokenizer needs
`transformers`; for a copy on the HF hub set `model_cfg.text_cfg.hf_tokenizer_name` to the repo id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipelines.clip_tokenizer import EOT_ID
from data_pipelines.tokenizer import EOS_ID, PAD_ID
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
from pretrain.export.tokenizers import check_tokenizer, export_rows, is_clip, tokenizer_in_folder
from pretrain.models.transformer import fused_qkv_to_stacked, stacked_to_fused_qkv

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILE = "open_clip_model.safetensors"
"""The first name open_clip's `local-dir:` loader looks for."""
WEIGHT_FILES = (WEIGHT_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
"""open_clip's own preference order for the weights of a folder."""

_BLOCK: tuple[tuple[str, str], ...] = (
    ("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_VISUAL_TOP = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
               "ln_post.weight", "ln_post.bias", "proj")
_TEXT_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection")
_TOWERS = (("visual.", "visual."), ("text.", ""))  # (our prefix, open_clip's prefix)


def _blocks(layers: dict[str, int]) -> Iterator[tuple[str, str, str]]:
    """(tower, our block prefix, open_clip block prefix) for every block of both towers."""
    for ours, theirs in _TOWERS:
        tower = ours.rstrip(".")
        for i in range(layers[tower]):
            yield tower, f"{ours}transformer.resblocks.{i}.", f"{theirs}transformer.resblocks.{i}."


def _top_pairs() -> Iterator[tuple[str, str]]:
    yield from ((f"visual.{n}", f"visual.{n}") for n in _VISUAL_TOP)
    yield from ((f"text.{n}", n) for n in _TEXT_TOP)


def to_open_clip_state_dict(state: dict[str, torch.Tensor], layers: dict[str, int], heads: dict[str, int]
                            ) -> dict[str, torch.Tensor]:
    """open_clip `CLIP` state dict of our towers and logit scale (+ SigLIP logit bias when present);
    `layers`/`heads` are keyed by "visual" and "text"."""
    out = {theirs: state[ours] for ours, theirs in _top_pairs()}
    out["logit_scale"] = state["logit_scale"].reshape(())
    if "logit_bias" in state:
        out["logit_bias"] = state["logit_bias"].reshape(())
    for tower, ours, theirs in _blocks(layers):
        for kind in ("weight", "bias"):
            qkv = state[f"{ours}attn.qkv.{kind}"]
            out[f"{theirs}attn.in_proj_{kind}"] = fused_qkv_to_stacked(qkv, heads[tower])
        for a, b in _BLOCK:
            for kind in ("weight", "bias"):
                out[f"{theirs}{b}.{kind}"] = state[f"{ours}{a}.{kind}"]
    return out


def from_open_clip_state_dict(oc: dict[str, torch.Tensor], layers: dict[str, int], heads: dict[str, int]
                              ) -> dict[str, torch.Tensor]:
    """Inverse of `to_open_clip_state_dict`; every key must be consumed, so weights we would silently
    drop fail the import instead."""
    left = dict(oc)

    def take(key: str) -> torch.Tensor:
        if key not in left:
            raise ValueError(f"open_clip checkpoint has no {key!r}: not a standard CLIP with the configured "
                             f"layers")
        return left.pop(key)

    out = {ours: take(theirs) for ours, theirs in _top_pairs()}
    out["logit_scale"] = take("logit_scale").reshape(1)
    if "logit_bias" in left:
        out["logit_bias"] = take("logit_bias").reshape(1)
    for tower, ours, theirs in _blocks(layers):
        for kind in ("weight", "bias"):
            stacked = take(f"{theirs}attn.in_proj_{kind}")
            out[f"{ours}attn.qkv.{kind}"] = stacked_to_fused_qkv(stacked, heads[tower])
        for a, b in _BLOCK:
            for kind in ("weight", "bias"):
                out[f"{ours}{a}.{kind}"] = take(f"{theirs}{b}.{kind}")
    if left:
        raise ValueError(f"open_clip checkpoint has weights our model has no place for: {sorted(left)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- export
def model_cfg(cfg: Config, vocab_rows: int, logit_scale: float, logit_bias: float | None,
              tokenizer_name: str | None) -> dict[str, Any]:
    """open_clip `model_cfg` (CLIPVisionCfg / CLIPTextCfg fields) equal to our architecture.
    `tokenizer_name` None: OpenAI CLIP's tokenizer, i.e. open_clip's own default (`SimpleTokenizer`) and
    its argmax pooling."""
    m = cfg.model
    norm = {"eps": LAYER_NORM_EPS}
    vision = {"image_size": m.image_size, "patch_size": m.vision.patch_size, "width": m.vision.width,
              "layers": m.vision.layers, "head_width": m.vision.width // m.vision.heads,
              "mlp_ratio": m.mlp_ratio,
              "pool_type": "tok", "final_ln_after_pool": False, "no_ln_pre": False,
              "pos_embed_type": "learnable", "norm_kwargs": norm}
    text = {"context_length": m.text.context_length, "vocab_size": vocab_rows, "width": m.text.width,
            "heads": m.text.heads, "layers": m.text.layers, "mlp_ratio": m.mlp_ratio, "pool_type": "eos",
            "eos_id": EOS_ID, "pad_id": PAD_ID, "no_causal_mask": False, "proj_type": "linear",
            "proj_bias": False, "norm_kwargs": norm, "hf_tokenizer_name": tokenizer_name}
    if tokenizer_name is None:  # OpenAI CLIP's tokenizer: open_clip's defaults
        for key in ("eos_id", "hf_tokenizer_name"):
            del text[key]
        text["pool_type"] = "argmax"
    out: dict[str, Any] = {"embed_dim": m.embed_dim, "quick_gelu": m.activation == "quick_gelu",
                           "init_logit_scale": logit_scale, "vision_cfg": vision, "text_cfg": text}
    if logit_bias is not None:
        out["init_logit_bias"] = logit_bias  # makes open_clip build the `logit_bias` parameter
    return out


def preprocess_cfg(cfg: Config) -> dict[str, Any]:
    """open_clip's eval transform settings equal to ours: shorter side resized (bicubic), centre crop."""
    return {"size": cfg.model.image_size, "mode": "RGB", "mean": list(cfg.data.mean),
            "std": list(cfg.data.std), "interpolation": "bicubic", "resize_mode": "shortest"}


def export_open_clip(state: dict[str, torch.Tensor], cfg: Config, tokenizer_json: str, out: Path,
                     dtype: torch.dtype = torch.float32, name: str | None = None) -> None:
    """Write an open_clip folder from our single-device state dict into the existing `out`.

    Files: open_clip_model.safetensors (tensors in `dtype`), open_clip_config.json ({"model_cfg",
    "preprocess_cfg"}) and the tokenizer files open_clip's `get_tokenizer("local-dir:...")` reads through
    transformers. Only the CLIP towers, the logit scale and a SigLIP logit bias are exported: the MAE
    decoder and the MLM head have no place in open_clip's `CLIP`. Load commands: module docstring.
    `name` (default: `out`'s own folder name) is recorded as `text_cfg.hf_tokenizer_name` with our BPE;
    `local-dir:` loading ignores it, a hub copy replaces it with the repo id. A caller writing into a
    staging folder that is renamed later (`pretrain convert`) passes the final folder's name.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"export folder {out} does not exist")
    check_state_matches_config(state, cfg)
    m = cfg.model
    layers = {"visual": m.vision.layers, "text": m.text.layers}
    heads = {"visual": m.vision.heads, "text": m.text.heads}
    state = {k: v.detach() for k, v in state.items()}  # live parameters in-process: no autograd
    bias = float(state["logit_bias"].reshape(())) if "logit_bias" in state else None
    state = export_rows(state, tokenizer_json)  # OpenAI CLIP's tokenizer: its 49,408 rows
    write_hf_tokenizer_files(out, tokenizer_json, m.text.context_length)
    write_safetensors(to_open_clip_state_dict(state, layers, heads), out / WEIGHT_FILE, dtype)
    config = model_cfg(cfg, state["text.token_embedding.weight"].shape[0],
                       float(state["logit_scale"].reshape(())), bias,
                       None if is_clip(tokenizer_json) else (name or out.resolve().name))
    write_json(out / CONFIG_FILE, {"model_cfg": config, "preprocess_cfg": preprocess_cfg(cfg)})


# ---------------------------------------------------------------------------------------------- import
_VISION_DEFAULTS: dict[str, Any] = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0,
                                    "patch_size": 16, "image_size": 224}
_TEXT_DEFAULTS: dict[str, Any] = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                  "layers": 12, "mlp_ratio": 4.0, "pool_type": "argmax", "eos_id": 2}
"""open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the fields an import reads."""

# settings that change the computation away from our towers, with the values that keep it ours (absent
# keys take open_clip's default, which is the first value; `block_type` "default" is the standard block)
_COMMON_FIXED: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "act_kwargs": (None,), "block_type": (None, "default"), "qk_norm": (False,),
    "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,)}
_VISION_FIXED = {**_COMMON_FIXED, "timm_model_name": (None,), "attentional_pool": (False,),
                 "no_ln_pre": (False,), "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,),
                 "pool_type": ("tok",)}
_TEXT_FIXED = {**_COMMON_FIXED, "hf_model_name": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
               "proj_bias": (False,), "proj_type": ("linear",)}


def _unsupported(model: dict[str, Any], vision: dict[str, Any], text: dict[str, Any]) -> list[str]:
    """Every open_clip setting in the config that our towers cannot reproduce, described."""
    problems = []
    if model.get("custom_text") or "multimodal_cfg" in model:
        problems.append("custom_text / multimodal_cfg (CustomTextCLIP or CoCa, not the standard CLIP)")
    for name, sub, fixed in (("vision_cfg", vision, _VISION_FIXED), ("text_cfg", text, _TEXT_FIXED)):
        for key, allowed in fixed.items():
            if sub.get(key, allowed[0]) not in allowed:
                problems.append(f"{name}.{key}={sub[key]!r} (ours: {allowed[0]!r})")
        norm = sub.get("norm_kwargs") or {}
        if set(norm) - {"eps"} or abs(float(norm.get("eps", 1e-5)) - LAYER_NORM_EPS) > 1e-12:
            problems.append(f"{name}.norm_kwargs={norm!r} (ours: eps {LAYER_NORM_EPS})")
    if isinstance(vision["layers"], (list, tuple)):
        problems.append("vision_cfg.layers is a list (ModifiedResNet image tower, ours is a ViT)")
    eos_pool = text["pool_type"] == "eos" and text["eos_id"] in (EOS_ID, EOT_ID)
    if not (text["pool_type"] == "argmax" or eos_pool):
        problems.append(f"text_cfg.pool_type={text['pool_type']!r} eos_id={text['eos_id']!r}: our text tower "
                        f"pools at the first [EOS] of our tokenizer (pool_type 'eos', eos_id {EOS_ID}) or, "
                        f"with OpenAI CLIP's tokenizer, at argmax ('argmax', or 'eos' with {EOT_ID})")
    if vision["mlp_ratio"] != text["mlp_ratio"]:
        problems.append(f"different MLP ratios per tower ({vision['mlp_ratio']} vs {text['mlp_ratio']}); "
                        f"model.mlp_ratio is shared")
    return problems


def _square(value: Any, name: str, src: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{src}: non-square vision_cfg.{name} {value} is not supported (our towers "
                             f"are square)")
        value = value[0]
    return int(value)


def _overrides(model: dict[str, Any], vision: dict[str, Any], text: dict[str, Any],
               preprocess: dict[str, Any], src: Path) -> dict[str, Any]:
    image_size = _square(vision["image_size"], "image_size", src)
    patch = _square(vision["patch_size"], "patch_size", src)
    if vision["width"] % vision["head_width"]:
        raise ValueError(f"{src}: vision_cfg.width {vision['width']} is not a multiple of head_width "
                         f"{vision['head_width']}")
    out: dict[str, Any] = {
        "model.image_size": image_size,
        "model.embed_dim": int(model["embed_dim"]),
        "model.mlp_ratio": float(vision["mlp_ratio"]),
        "model.activation": "quick_gelu" if model.get("quick_gelu") else "gelu",
        "model.vision.patch_size": patch,
        "model.vision.width": int(vision["width"]),
        "model.vision.layers": int(vision["layers"]),
        "model.vision.heads": int(vision["width"]) // int(vision["head_width"]),
        "model.text.width": int(text["width"]),
        "model.text.layers": int(text["layers"]),
        "model.text.heads": int(text["heads"]),
        "model.text.context_length": int(text["context_length"]),
    }
    if "mean" in preprocess and "std" in preprocess:
        out["data.mean"] = [float(x) for x in preprocess["mean"]]
        out["data.std"] = [float(x) for x in preprocess["std"]]
    return out


def read_open_clip_weights(src: Path) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip folder, the file chosen in open_clip's own order of preference."""
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return load_weight_file(src / name)
    raise FileNotFoundError(f"{src}: no open_clip weights ({', '.join(WEIGHT_FILES[:3])}, ...) found")


def import_open_clip(src: Path, tokenizer_json: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """Read an open_clip folder: (our-named fp32 state dict of the CLIP towers, logit scale and SigLIP bias,
    dotted config overrides that make `PretrainModel` match it, tokenizer record or None).

    Load the state with `load_state_dict(state, strict=False)`: the decoder and MLM head keep their fresh
    initialisation. A checkpoint with a logit bias adds `objectives.contrastive.loss: siglip` so our model
    has that parameter. Raises ValueError naming each setting our towers cannot express (timm/HF towers,
    layer scale, attentional pooling, other norms or per-tower MLP ratios, ...). The tokenizer is
    `tokenizer_json`, else the folder's, else OpenAI CLIP's when the text pools as CLIP's (argmax).
    """
    src = Path(src)
    verify_own_export(src)  # our own export: its manifest must hold
    config = read_json(src / CONFIG_FILE)
    model = config.get("model_cfg", config)
    if "vision_cfg" not in model or "text_cfg" not in model or "embed_dim" not in model:
        raise ValueError(f"{src / CONFIG_FILE}: no model_cfg with embed_dim, vision_cfg and text_cfg")
    if tokenizer_json is None:
        tokenizer_json = tokenizer_in_folder(src)
    return import_open_clip_weights(read_open_clip_weights(src), model, config.get("preprocess_cfg") or {},
                                    tokenizer_json, str(src))


def check_open_clip_config(model: dict[str, Any], src: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision_cfg, text_cfg) with open_clip's defaults filled in; a ValueError naming every setting of
    `model` our towers cannot express."""
    vision = {**_VISION_DEFAULTS, **model["vision_cfg"]}
    text = {**_TEXT_DEFAULTS, **model["text_cfg"]}
    problems = _unsupported(model, vision, text)
    if problems:
        raise ValueError(f"{src}: unsupported open_clip config: " + "; ".join(problems))
    return vision, text


def _attention_shapes(layers: dict[str, int], widths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """open_clip's stacked in-projection shapes ([3 W, W] and [3 W]) that the config implies, checked
    before they are reshaped into our fused QKV (a wrong `--arch` would fail inside the reshape)."""
    out: dict[str, tuple[int, ...]] = {}
    for tower, _, theirs in _blocks(layers):
        w = widths[tower]
        out[f"{theirs}attn.in_proj_weight"] = (3 * w, w)
        out[f"{theirs}attn.in_proj_bias"] = (3 * w,)
    return out


def import_open_clip_weights(weights: dict[str, torch.Tensor], model: dict[str, Any],
                             preprocess: dict[str, Any], tokenizer_json: str | None, src: str,
                             config: str = CONFIG_FILE
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """`import_open_clip` for weights already read and an open_clip `model_cfg` from anywhere (a folder's
    config, a named architecture, one inferred from an OpenAI state dict); `config` says which, for the
    error when the weights do not have its shapes."""
    vision, text = check_open_clip_config(model, src)
    overrides = _overrides(model, vision, text, preprocess, Path(src))
    clip_pooling = text["pool_type"] == "argmax" or text["eos_id"] == EOT_ID
    pooling = f"text_cfg.pool_type={text['pool_type']!r}" + ("" if text["pool_type"] == "argmax"
                                                              else f" eos_id={text['eos_id']}")
    tokenizer_json, vocab = check_tokenizer(int(text["vocab_size"]), tokenizer_json, clip_pooling,
                                            f"{src} ({pooling})")
    overrides.update(vocab)
    layers = {"visual": overrides["model.vision.layers"], "text": overrides["model.text.layers"]}
    heads = {"visual": overrides["model.vision.heads"], "text": overrides["model.text.heads"]}
    widths = {"visual": overrides["model.vision.width"], "text": overrides["model.text.width"]}
    check_source_shapes(weights, _attention_shapes(layers, widths), src, config)
    state = from_open_clip_state_dict(weights, layers, heads)
    if "logit_bias" in state:
        overrides["objectives.contrastive.loss"] = "siglip"
    return {k: v.float() for k, v in state.items()}, overrides, tokenizer_json
