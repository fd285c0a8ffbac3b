"""Imports of real OpenAI / LAION CLIP checkpoints that carry no config of their own.

* `--from open_clip SRC --arch ViT-B-32` (or any other name open_clip ships a model config for, e.g.
  `ViT-B-16`, `ViT-L-14`, `ViT-B-32-quickgelu`): SRC is the weights file (`open_clip_pytorch_model.bin`,
  `.safetensors`, a training checkpoint with `state_dict`) or a folder holding one; the architecture is
  read from `open_clip/model_configs/<arch>.json` inside the installed package, without importing it.
* `--from openai SRC`: OpenAI's own state-dict layout (the names open_clip's `CLIP` also uses), as a plain
  state dict or OpenAI's released TorchScript archive (ViT-B-32.pt ...). The architecture is inferred from
  the tensor shapes exactly as open_clip's `build_model_from_openai_state_dict` does (heads = width / 64,
  QuickGELU, the text tower pooling at argmax).

Both end in `pretrain.export.open_clip.import_open_clip_weights`, so what our towers cannot express
(ModifiedResNet image towers, timm/HF towers, SigLIP's tokenizers, ...) is refused naming each setting.
Nothing is downloaded and nothing in the file runs: torch pickles are read with `weights_only=True`; a
TorchScript archive is never given to `torch.jit.load` (which would run the TorchScript code it carries,
a scripted `__setstate__` included) but read as data by `pretrain.export.torchscript`: its pickled module
records with a restricted unpickler, tensors from its storage records, parameter and buffer names from
its code text. An archive whose modules restore themselves through their own `__setstate__` is refused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from pretrain.export.common import load_weight_file
from pretrain.export.open_clip import WEIGHT_FILES, check_open_clip_config, import_open_clip_weights
from pretrain.export.torchscript import is_torchscript, read_torchscript_state

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
"""open_clip's `OPENAI_DATASET_MEAN/STD`: the preprocessing of OpenAI's and LAION's standard ViTs."""
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
"""Non-weight entries of OpenAI's state dicts (open_clip drops the first three too) and the causal mask
buffer a traced (TorchScript) model carries."""
HEAD_WIDTH = 64
"""OpenAI CLIP's attention head width in both towers (its state dicts do not record head counts)."""


def _model_configs_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--arch reads open_clip's model configs from the open_clip_torch package, which is "
                         "not installed (pip install open_clip_torch)")
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def arch_config(arch: str) -> dict[str, Any]:
    """open_clip's model config of a named architecture, from the installed package."""
    path = _model_configs_dir() / f"{arch}.json"
    if not path.is_file():
        known = sorted(p.stem for p in _model_configs_dir().glob("ViT-*.json"))
        raise ValueError(f"--arch {arch!r}: open_clip ships no such model config (ViT architectures it has: "
                         f"{', '.join(known[:12])}, ...)")
    return json.loads(path.read_text(encoding="utf-8"))


def _weights_file(src: Path) -> Path:
    if src.is_file():
        return src
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"{src}: no weights file ({', '.join(WEIGHT_FILES[:4])}, ...) found")


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file or folder: safetensors, torch pickle (weights only) or TorchScript (read
    as data, `pretrain.export.torchscript`: nothing in it runs)."""
    path = _weights_file(Path(src))
    if is_torchscript(path):
        return read_torchscript_state(path)
    return load_weight_file(path)


def import_arch(src: Path, arch: str, tokenizer_json: str | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """`--from open_clip SRC --arch NAME`: weights of open_clip's architecture NAME (see module docstring);
    returns what `import_open_clip` returns."""
    model, label = arch_config(arch), f"{src} (--arch {arch})"
    check_open_clip_config(model, label)  # before reading gigabytes of weights
    return import_open_clip_weights(read_weights(src), model, {"mean": OPENAI_MEAN, "std": OPENAI_STD},
                                    tokenizer_json, label, f"--arch {arch}")


def openai_model_cfg(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """open_clip `model_cfg` of an OpenAI-layout state dict, inferred from shapes as open_clip does."""
    if "visual.proj" not in state:
        kind = "ModifiedResNet (RN50, RN101, ...)" if any(k.startswith("visual.layer1.") for k in state) \
            else "unknown"
        raise ValueError(f"image tower is {kind}, not a ViT: our image tower is a ViT (unsupported: "
                         f"visual.layer*/attnpool weights)")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight",
                "visual.transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in state:
            raise ValueError(f"not an OpenAI CLIP state dict: no {key!r}")
    v_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = state["ln_final.weight"].shape[0]
    v_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    t_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / v_width
    t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width if t_layers else v_mlp
    return {"embed_dim": state["text_projection"].shape[1], "quick_gelu": True,
            "vision_cfg": {"image_size": patch * grid, "patch_size": patch, "width": v_width,
                           "layers": v_layers, "head_width": HEAD_WIDTH, "mlp_ratio": v_mlp},
            "text_cfg": {"context_length": state["positional_embedding"].shape[0],
                         "vocab_size": state["token_embedding.weight"].shape[0], "width": t_width,
                         "heads": max(t_width // HEAD_WIDTH, 1), "layers": t_layers, "mlp_ratio": t_mlp}}


def import_openai(src: Path, tokenizer_json: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """`--from openai SRC`: an OpenAI-format CLIP (see module docstring); returns what `import_open_clip`
    returns."""
    state = {k: v for k, v in read_weights(src).items()
             if k not in OPENAI_EXTRA_KEYS and not k.endswith(".attn_mask")}  # masks are never weights
    try:
        model = openai_model_cfg(state)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    return import_open_clip_weights(state, model, {"mean": OPENAI_MEAN, "std": OPENAI_STD}, tokenizer_json,
                                    f"{src} (OpenAI format)", "the architecture inferred from its shapes")
