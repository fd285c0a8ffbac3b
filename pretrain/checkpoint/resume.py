"""Where a run starts: fresh; a DeepSpeed checkpoint of the same layout; a universal checkpoint of any
layout; or another model's weights (`--init-from`: imports, exports, checkpoints) with a fresh optimizer.

`resolve_start` runs before the model exists (it supplies the tokenizer and refuses a config that does
not fit the checkpoint); `StartPoint.load` runs once the engine exists and returns the step and data
positions to continue from. Universal checkpoints also get written here, next to each DeepSpeed save.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from parallel import groups
from parallel.consensus import failures_by_rank
from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import universal as universal_io
from pretrain.checkpoint.sources import DeepSpeedSource, Source, UniversalSource, is_universal, open_source
from pretrain.checkpoint.universal_load import load_full_tensors, load_universal
from pretrain.config import Config, ConfigError, ModelConfig, config_from_dict

log = logging.getLogger("mmpt.train")
KERNEL_SWITCHES = ("attention", "fused_layernorm")
"""model.* keys that choose kernels, not weights: a checkpoint resumes under either setting."""


def _architecture(model: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in KERNEL_SWITCHES}


@dataclasses.dataclass
class StartPoint:
    universal: UniversalSource | None = None
    target: tuple[Path, str] | None = None  # DeepSpeed checkpoint root and tag
    init: Source | None = None
    client: dict[str, Any] | None = None  # step, config, tokenizer, data positions, RNG of a resume

    @property
    def resumed(self) -> bool:
        return self.client is not None

    @property
    def tokenizer_state(self) -> dict[str, Any] | None:
        """Where the run's tokenizer comes from (a resume's or the init weights'), if anywhere."""
        return self.client or (self.init.meta if self.init else None)

    def describe(self) -> str:
        if self.universal is not None:
            return str(self.universal.path)
        return f"{self.target[0]}/{self.target[1]}" if self.target else "scratch"

    def load(self, engine: Any) -> tuple[int, Any]:
        """Put the start state into `engine`; return (start step, saved data positions or None)."""
        if self.universal is not None:
            load_universal(engine, self.universal)
        elif self.target is not None:
            # every rank checks its files (sha256, weights-only), then DeepSpeed loads, never unpickling
            ckpt.load_deepspeed(engine, *self.target)
        elif self.init is not None:
            load_full_tensors(engine, self.init.tensor, self.init.layout, keys=("fp32",))
            log.info("initialised weights from %s (fresh optimizer, step 0)", self.init.path)
        if self.client is None:
            return 0, None
        torch.set_rng_state(self.client["rng"])
        step = int(self.client["step"])
        log.info("resumed from %s at step %d", self.describe(), step)
        # every rank's positions: the loader re-deals them if the layout changed
        return step, self.client["data_positions"]


def open_universal(resume: str) -> UniversalSource | None:
    """The universal checkpoint `resume` names (a folder with universal.json, or a folder of them with a
    `latest` file), else None."""
    path = Path(resume)
    if not is_universal(path) and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    return UniversalSource(path) if is_universal(path) else None


def resolve_start(cfg: Config, root: Path, resume: str | None, init_from: str | None) -> StartPoint:
    """Find the checkpoint (or weights) to start from and check it fits `cfg`; nothing is loaded yet."""
    start = StartPoint()
    if resume:
        start.universal = open_universal(resume)  # layout-free: any (dp, tp) resumes it
        if start.universal is not None:
            start.client = start.universal.client_state()
        else:
            start.target = ckpt.resolve(resume, root)
            start.client = ckpt.read_client_state(*start.target) if start.target else None
    if start.client is not None:
        saved = config_from_dict(start.client["config"])
        if _architecture(saved.model) != _architecture(cfg.model) or saved.objectives != cfg.objectives:
            raise ConfigError(f"--resume {resume}: model or objectives config differs from the checkpoint's; "
                              "resume with the same model.* and objectives.* settings")
    elif init_from:
        start.init = open_source(init_from)
        if _architecture(start.init.config.model) != _architecture(cfg.model):
            raise ConfigError(f"--init-from {init_from}: its model config differs from this run's; train "
                              f"with its config (`--config {Path(init_from) / 'train.yaml'}` for imports) or "
                              "the same model.* settings")
    return start


def save_universal(root: Path, tag: str) -> None:
    """Also write the just-published checkpoint as `<root>/universal/<tag>` (rank 0 converts, reading the
    files back parameter by parameter; the others wait). Retention follows the DeepSpeed checkpoints.

    A failure on rank 0 raises CheckpointSaveError on every rank (the DeepSpeed checkpoint stays)."""
    error: Exception | None = None
    if groups.rank() == 0:
        try:
            out = universal_io.write_universal(DeepSpeedSource(root, tag), root / "universal" / tag,
                                               overwrite=True)
            (root / "universal" / "latest").write_text(tag)
            kept = set(ckpt.complete_tags(root))
            for old in (root / "universal").iterdir():
                if old.is_dir() and old.name.startswith("global_step") and old.name not in kept:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("saved universal checkpoint %s (%.1f MB in %.1f s)", out["out"], out["bytes"] / 1e6,
                     out["seconds"])
        except Exception as e:  # the other ranks wait for rank 0's verdict below, whatever happened
            error = e
    failed = failures_by_rank(error)
    if failed:
        raise ckpt.CheckpointSaveError(f"writing the universal copy of {root}/{tag} failed on "
                                       f"{'; '.join(failed)}; the DeepSpeed checkpoint {tag} is saved")
