"""Full single-device weights from a tensor-parallel DeepSpeed checkpoint (for eval and export).

DeepSpeed writes one set of files per TP rank (`..._mp_rank_{t:02d}_...`), and its zero_to_fp32 reader
refuses several of them. Each TP rank's files are a complete ZeRO checkpoint of that rank's shards, so:
consolidate each TP rank on its own (DeepSpeed's reader on a folder of links to just that rank's files),
then join the slices. Which dimension a tensor was split along is read off the shapes: the single-device
model's tensor is `tp` times larger along exactly that dimension (and equal everywhere for replicated
tensors), so no split metadata has to be stored and any TP degree that divides the widths works.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

log = logging.getLogger("mmpt.checkpoint")
_MP_RANK = re.compile(r"mp_rank_(\d+)_")


def tp_ranks_in(tag_dir: Path) -> list[int]:
    """TP ranks that wrote model-state files into `tag_dir` ([0] for a run without TP)."""
    found = (_MP_RANK.search(f.name) for f in Path(tag_dir).glob("*model_states.pt"))
    ranks = {int(m.group(1)) for m in found if m}
    return sorted(ranks) or [0]


def merge_tp_slices(slices: list[Mapping[str, torch.Tensor]], full_shapes: Mapping[str, torch.Size]
                    ) -> dict[str, torch.Tensor]:
    """Join per-TP-rank state dicts into single-device tensors of `full_shapes`.

    A tensor whose slice already has the full shape is replicated: TP rank 0's copy is used (a replica
    that differs is logged, since replicated parameters must stay identical across TP ranks)."""
    tp = len(slices)
    out: dict[str, torch.Tensor] = {}
    for key, first in slices[0].items():
        if key.endswith("_extra_state"):
            continue
        full = full_shapes.get(key)
        if full is None or tuple(first.shape) == tuple(full):
            out[key] = first
            for t, sl in enumerate(slices[1:], start=1):
                if not torch.equal(sl[key], first):
                    log.warning("%s differs between TP rank 0 and %d (max |diff| %.3g)", key, t,
                                float((sl[key].float() - first.float()).abs().max()))
            continue
        dims = [d for d in range(len(full)) if first.shape[d] * tp == full[d]
                and all(first.shape[e] == full[e] for e in range(len(full)) if e != d)]
        if len(dims) != 1:
            raise ValueError(f"{key}: a slice of shape {tuple(first.shape)} is not 1/{tp} of {tuple(full)} "
                             "along exactly one dimension")
        out[key] = torch.cat([sl[key] for sl in slices], dim=dims[0])
    return out


def consolidate(root: Path, tag: str, full_shapes: Mapping[str, torch.Size],
                read_one: Callable[[Path, str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Single-device state dict of checkpoint `root/tag`; `read_one(root, tag)` consolidates the ZeRO
    shards of a checkpoint folder with one TP rank (`pretrain.checkpoint.atomic.consolidated_state_dict`)."""
    tag_dir = Path(root) / tag
    ranks = tp_ranks_in(tag_dir)
    if len(ranks) == 1:
        return read_one(Path(root), tag)
    slices = []
    for t in ranks:
        with tempfile.TemporaryDirectory(prefix="mmpt-tp-") as d:
            sub = Path(d) / tag
            sub.mkdir()
            for f in tag_dir.glob(f"*mp_rank_{t:02d}_*"):
                (sub / f.name).symlink_to(f.resolve())
            (Path(d) / "latest").write_text(tag)
            slices.append(read_one(Path(d), tag))
    return merge_tp_slices(slices, full_shapes)
