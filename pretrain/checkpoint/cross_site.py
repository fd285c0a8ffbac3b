"""The training loop's side of training across sites: what a site must agree on with the others (its
fingerprint), and where each rank's outer state lives in a checkpoint. The outer loop itself is
`parallel/cross_site.py`; the design is in docs/cross_site.md."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from parallel import groups
from parallel.cross_site import OuterLoop
from pretrain.checkpoint.resume import KERNEL_SWITCHES
from pretrain.checkpoint.weights_only import safe_load
from pretrain.config import Config

log = logging.getLogger("mmpt.train")


def fingerprint(cfg: Config, tokenizer_text: str) -> dict[str, Any]:
    """What every site must share, key by key (a mismatch is reported by these names): the architecture,
    the tokenizer (token ids must mean the same words everywhere: give every site the same
    `data.tokenizer`), the initial weights' seed, H, the outer step (every site applies it to the same
    average on its own: a different outer_lr or outer_momentum would make `synced` drift apart silently) and
    the layout (rank r exchanges with rank r)."""
    model = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items() if k not in KERNEL_SWITCHES}
    return {
        **model,
        "tokenizer_sha256": hashlib.sha256(tokenizer_text.encode()).hexdigest()[:16],
        "train.seed": cfg.train.seed,
        "cross_site.every": cfg.cross_site.every,
        "cross_site.sites": cfg.cross_site.sites,
        "cross_site.outer_lr": cfg.cross_site.outer_lr,
        "cross_site.outer_momentum": cfg.cross_site.outer_momentum,
        "world_size": groups.world_size(),
        "parallel.tp": cfg.parallel.tp,
        "train.freeze": list(cfg.train.freeze),
    }


def rank_outer_state(target: tuple[Path, str] | None) -> dict[str, Any] | None:
    """This rank's outer state from the DeepSpeed checkpoint it resumed from: ZeRO-3 writes one model-states
    file per (dp, tp) rank, each holding the client state that rank passed, so each rank reads its own."""
    if target is None:
        return None
    root, tag = target
    name = f"zero_pp_rank_{groups.dp_rank()}_mp_rank_{groups.tp_rank():02d}_model_states.pt"
    path = Path(root) / tag / name
    if not path.exists():
        return None
    return (safe_load(path).get("mmpt") or {}).get("cross_site")


def start_outer_loop(cfg: Config, engine: Any, start: Any, run_dir: Path) -> OuterLoop | None:
    """The outer loop of this site, joined to the others and at the resumed outer state (None when
    `cross_site.sites` <= 1)."""
    if cfg.cross_site.sites <= 1:
        return None
    tokenizer_text = (run_dir / "tokenizer.json").read_text()
    loop = OuterLoop(cfg.cross_site, engine.module, fingerprint(cfg, tokenizer_text), engine.device,
                     run_dir=run_dir)  # released rounds recorded there too: epsilon survives a crash
    state = rank_outer_state(start.target if start.universal is None else None)
    if start.resumed and state is None:
        log.warning("cross-site: the checkpoint has no outer state for this rank (another layout, or saved "
                    "without cross_site); the outer state starts from the resumed weights")
    if state is not None and loop.load_state_dict(state):
        log.info("cross-site: outer state of round %d restored from the checkpoint", loop.round)
    loop.join()
    return loop
