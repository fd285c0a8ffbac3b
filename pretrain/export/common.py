"""Exports of the CLIP part of `PretrainModel` to Hugging Face `transformers` and open_clip, and imports back.

`pretrain.export.hf` and `pretrain.export.open_clip` hold the per-library name mappings; this module holds
what both need: which of our parameters are the CLIP towers, file writing (safetensors, JSON, tokenizer
files), reading foreign weight files safely, and the config overrides an import hands back.

Only the two CLIP towers and the logit scale leave the model: the MAE decoder, the MLM head and the
cross-modal fusion encoder with its ITM head have no counterpart in either library, so exports drop them
(the manifest's `left_out` names them, and the convert log says so when the fusion part is among them)
and imports leave them at their fresh initialisation.
Neither this module nor the exporters import `transformers` or `open_clip`: writing an export needs only
`safetensors`; the libraries are needed to load the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipelines.tokenizer import EOS, MASK, PAD, SOS, UNK, TextTokenizer
from pretrain.config import Config
from pretrain.models.transformer import LAYER_NORM_EPS as _EPS

__all__ = ["CLIP_PREFIXES", "KEPT_BY_TARGET", "LAYER_NORM_EPS", "check_import_shapes", "check_source_shapes",
           "check_state_matches_config", "clip_state", "left_out_parts", "load_weight_file", "read_json",
           "tokenizer_from_json", "verify_own_export", "write_hf_tokenizer_files", "write_json",
           "write_safetensors"]

CLIP_PREFIXES: tuple[str, ...] = ("visual.", "text.")
"""Our state-dict prefixes of the two CLIP towers (everything else but the logit scale is left behind)."""

LAYER_NORM_EPS: float = _EPS
"""The epsilon of every LayerNorm in our towers, read from the model code so exports cannot drift."""


# ------------------------------------------------------------------------------------------ state dicts
def clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP towers' tensors of our state dict (decoder, MLM head and logit scale/bias excluded)."""
    return {k: v for k, v in state.items() if k.startswith(CLIP_PREFIXES)}


KEPT_BY_TARGET: dict[str | None, tuple[str, ...]] = {
    "hf": ("logit_scale",), "open_clip": ("logit_scale", "logit_bias"), None: ("logit_scale", "logit_bias")}
"""Top-level parameters besides the towers that each export target carries. HF's `CLIPModel` has a
`logit_scale` but no place for SigLIP's `logit_bias`; open_clip's `CLIP` has both (`init_logit_bias`)."""


def left_out_parts(names: list[str] | tuple[str, ...], target: str | None = None) -> list[str]:
    """Top-level modules and parameters of our state dict that an export to `target` ("hf" or
    "open_clip") leaves behind (`decoder`, `mlm_head`, `fusion`, `itm_head`, ...; and for "hf" a SigLIP
    `logit_bias`, which `CLIPModel` has no place for), for the export's manifest (`left_out`) and log line.
    `target` None: what both targets leave out (kept for callers that do not name one)."""
    kept = KEPT_BY_TARGET[target] if target in KEPT_BY_TARGET else KEPT_BY_TARGET[None]
    return sorted({n.split(".")[0] for n in names if not n.startswith(CLIP_PREFIXES) and n not in kept})


TOKEN_EMBEDDING = "text.token_embedding.weight"


def check_import_shapes(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
                        source: str) -> None:
    """Before `load_state_dict` of an import: every tensor of `state` must have the shape the model built
    from the source's config has (the token table may have fewer rows: `pretrain convert` appends the
    fresh ones). A ValueError names the key and both shapes, instead of torch's size-mismatch traceback,
    when the config (HF config.json, open_clip_config.json or `--arch`) does not describe the weights."""
    for key, tensor in state.items():
        want = model_state.get(key)
        if want is None:  # a tensor the model has no place for: the caller names those
            continue
        got, exp = tuple(tensor.shape), tuple(want.shape)
        if key == TOKEN_EMBEDDING and len(got) == 2 and got[1:] == exp[1:] and got[0] <= exp[0]:
            continue
        if got != exp:
            raise ValueError(f"{source}: {key!r} has shape {list(got)} in the weights but {list(exp)} in the "
                             f"model its config describes (config.json for --from hf, open_clip_config.json "
                             f"or --arch for --from open_clip, the shapes for --from openai): the config "
                             f"does not belong to these weights")


def check_source_shapes(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str,
                        config: str) -> None:
    """Before a foreign state dict is reshaped into ours (the fused QKV): each key of `expected` present in
    `weights` must have that shape, or a ValueError names the key, both shapes and `config` (where the
    architecture came from: a config file or `--arch NAME`). Missing keys are left to the mapping, which
    names them."""
    for key, shape in expected.items():
        if key in weights and tuple(weights[key].shape) != tuple(shape):
            raise ValueError(f"{source}: {key!r} has shape {list(weights[key].shape)} in the weights but "
                             f"{config} implies {list(shape)}: the architecture does not match the weights")


def check_state_matches_config(state: dict[str, torch.Tensor], cfg: Config) -> None:
    """Fail with the offending key when `state` was not produced by a model of `cfg` (a config from
    another run would otherwise write a config.json that silently disagrees with the weights)."""
    m = cfg.model
    expected = {
        "visual.positional_embedding": ((m.image_size // m.vision.patch_size) ** 2 + 1, m.vision.width),
        "visual.proj": (m.vision.width, m.embed_dim),
        "text.positional_embedding": (m.text.context_length, m.text.width),
        "text.text_projection": (m.text.width, m.embed_dim),
        "visual.transformer.resblocks.0.mlp.fc1.weight": (int(m.vision.width * m.mlp_ratio), m.vision.width),
    }
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"state dict has no {key!r}: not a PretrainModel state dict")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"state dict {key!r} has shape {tuple(state[key].shape)} but the config implies "
                             f"{shape}: the config does not belong to these weights")
    for tower, layers in (("visual", m.vision.layers), ("text", m.text.layers)):
        last = f"{tower}.transformer.resblocks.{layers - 1}.ln_1.weight"
        extra = f"{tower}.transformer.resblocks.{layers}.ln_1.weight"
        if last not in state or extra in state:
            raise ValueError(f"state dict does not have {layers} {tower} blocks as the config says")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Write `tensors` (floating ones cast to `dtype`) with the project's streaming safetensors writer
    (`pretrain/checkpoint/tensor_files.py`: any view is written as its own bytes). Exports are written into a
    staged folder renamed into place only when complete (`pretrain convert`), so no temporary name here."""
    from pretrain.checkpoint.tensor_files import save_tensors

    save_tensors(path, {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
                        for k, v in tensors.items()}, metadata={"format": "pt"})


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle read with `weights_only=True` (nothing in a
    downloaded checkpoint may run code); a `{"state_dict": ...}` wrapper and DDP's `module.` prefix are
    undone."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 -- safetensors reports damage with its own error type
            raise ValueError(f"{path}: not a readable .safetensors file (truncated or damaged?): "
                             f"{type(exc).__name__}: {exc}") from None
    else:
        from pretrain.checkpoint.weights_only import safe_load

        state = safe_load(path)  # weights_only=True, the project's one loader
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------------ files
def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def verify_own_export(src: Path) -> None:
    """If `src` carries our `manifest.json` (a `pretrain convert --to hf|open_clip` export), check every file
    it lists (size and sha256) and raise IntegrityError naming a file that does not match, so a corrupt
    export is not imported and re-certified by the new folder's fresh manifest. Anyone else's folder has no
    such manifest and is read as it is."""
    from pretrain.checkpoint.tensor_files import MANIFEST, read_manifest, verify_manifest

    if not (Path(src) / MANIFEST).is_file():
        return
    manifest = read_manifest(Path(src))
    if isinstance(manifest, dict) and manifest.get("format") == "mmpt-manifest":
        verify_manifest(Path(src))


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def tokenizer_from_json(text: str) -> TextTokenizer:
    """Our tokenizer from tokenizer.json text; raises ValueError when its special ids are not ours."""
    return TextTokenizer.from_json(text)


def write_hf_tokenizer_files(out: Path, tokenizer_json: str, context_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable with
    `transformers.AutoTokenizer.from_pretrained(out)` as a fast tokenizer.

    The tokenizer.json carries our post-processor ([SOS] text [EOS]) and normaliser, so
    `tok(texts, padding="max_length", max_length=context_length, truncation=True)` yields exactly our
    `TextTokenizer.encode_batch` ids (truncation keeps [EOS], padding uses [PAD] = 0). OpenAI CLIP's
    tokenizer is written as the stock `CLIPTokenizer` files instead (`pretrain.export.tokenizers`).
    """
    from pretrain.export.tokenizers import is_clip, write_clip_tokenizer_files

    if is_clip(tokenizer_json):
        write_clip_tokenizer_files(out, context_length)
        return
    tokenizer_from_json(tokenizer_json)  # validates the special ids before anything is written
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    specials = {"pad_token": PAD, "unk_token": UNK, "bos_token": SOS, "eos_token": EOS, "mask_token": MASK}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # "[EOS]" typed in a caption is text, as in TextTokenizer
        **specials,
    })
    write_json(out / "special_tokens_map.json", specials)
