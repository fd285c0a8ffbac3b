"""Checkpoints: standard DeepSpeed layout (`latest`, `<tag>/zero_pp_rank_*_model_states.pt`) plus our
client state (step, config, tokenizer, data position, RNG), and loading it back for resume and eval."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(root: Path) -> str | None:
    f = Path(root) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag or None


def resolve(spec: str, default_root: Path) -> tuple[Path, str] | None:
    """Map `--resume` to (checkpoint root, tag).

    `latest` means the newest checkpoint under the run's own checkpoint folder, or None when there is
    none yet (a first start and a requeued restart then share one command line). Any other value is
    a checkpoint root (holding `latest`), a tag folder inside one, or a run directory; a path that
    holds no checkpoint is an error, never a silent fresh start.
    """
    if spec == "latest":
        tag = latest_tag(default_root)
        return (default_root, tag) if tag else None
    p = Path(spec)
    for root in (p, p / "checkpoints"):
        tag = latest_tag(root)
        if tag:
            return root, tag
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise FileNotFoundError(f"--resume {spec}: no DeepSpeed checkpoint there (expected a 'latest' file, "
                            "a tag folder with *_model_states.pt, or a run directory)")


def _model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no *_model_states.pt file; not a DeepSpeed checkpoint")
    rank0 = [f for f in files if re.search(r"(zero_pp_rank_0_)?mp_rank_00_model_states\.pt$", f.name)]
    return rank0[0] if rank0 else files[0]


def read_client_state(root: Path, tag: str | None = None) -> dict[str, Any]:
    """The client state saved with rank 0's model states (config, tokenizer, step, data positions)."""
    tag = tag or latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"{root}: no 'latest' file; not a checkpoint folder")
    state = torch.load(_model_states_file(Path(root) / tag), map_location="cpu", weights_only=False)
    client = state.get("mmpt")
    if client is None:
        raise ValueError(f"{root}/{tag}: checkpoint was not written by mmpt (no 'mmpt' client state)")
    return client


def consolidated_state_dict(root: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage, via DeepSpeed's own zero_to_fp32 reader."""
    tag = tag or latest_tag(root)
    tag_dir = Path(root) / str(tag)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) or any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO stage 0: the module's weights sit whole in the model states file
        state = torch.load(_model_states_file(tag_dir), map_location="cpu", weights_only=False)
        sd = state["module"]
    return {k: v.float() for k, v in sd.items()}
