"""Read one tensor-parallel rank's DeepSpeed ZeRO-3 files parameter by parameter, memory-mapped.

ZeRO-3 stores, per data-parallel rank d, one flat fp32 tensor per optimizer parameter group (and one flat
`exp_avg` / `exp_avg_sq` each) holding, for every parameter of the group in order, that rank's
`ceil(numel / dp)` elements (the last rank's slice zero-padded). Parameter i of a group is therefore
`cat(flat_d[off_i : off_i + part_i] for d in ranks)[:numel_i]`, where `off_i` is the sum of earlier parts;
the names and shapes in order come from `param_shapes` in the model-states file.

Files are opened memory-mapped and weights-only (`checkpoint.weights_only.mmap_load`): slicing reads only
the pages of the one parameter asked for, so converting a checkpoint needs memory for a few parameters, not
the model, and nothing is unpickled beyond tensors, containers and DeepSpeed's allow-listed records.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.weights_only import mmap_load

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_DP = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # bf16 runs prefix "bf16_"


def optim_files(tag_dir: Path, tp_rank: int) -> list[Path]:
    """This TP rank's optimizer-state files, ordered by data-parallel rank (checked contiguous)."""
    found = {}
    for f in Path(tag_dir).glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"):
        found[int(_DP.search(f.name).group(1))] = f
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no ZeRO optimizer-state files for TP rank {tp_rank}")
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{tag_dir}: optimizer-state files of DP ranks {sorted(found)} for TP rank "
                                f"{tp_rank}; some ranks' files are missing")
    return [found[d] for d in range(len(found))]


class Zero3Reader:
    """Full (TP-local) tensors of one TP rank of a ZeRO-3 checkpoint, read lazily from all DP ranks."""

    def __init__(self, tag_dir: Path, tp_rank: int = 0, window_mb: int = 64) -> None:
        self.tag_dir = Path(tag_dir)
        files = optim_files(self.tag_dir, tp_rank)
        self.dp, self._files = len(files), files
        self.model_states = mmap_load(self.tag_dir / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")
        self._optim = [mmap_load(f)["optimizer_state_dict"] for f in files]
        # Pages read through a mapping stay resident (and count in RSS) while it is open: re-map after
        # every window read so a conversion's footprint stays bounded whatever the model's size (the
        # window grows with the largest parameter so re-mapping stays rare for huge tensors).
        largest = max((torch.Size(s).numel() for g in self.model_states["param_shapes"] for s in g.values()),
                      default=0)
        self._window, self._read = max(window_mb << 20, 2 * 4 * largest), 0
        first = self._optim[0]
        stage = int(getattr(first.get("zero_stage"), "value", first.get("zero_stage", 0)))
        if stage != 3:
            raise ValueError(f"{self.tag_dir}: ZeRO stage {stage} checkpoint; layout conversion reads ZeRO "
                             "stage 3 (parallel.zero_stage=3, the default)")
        if int(first.get("partition_count", self.dp)) != self.dp:
            raise ValueError(f"{self.tag_dir}: written by {first['partition_count']} DP ranks but "
                             f"{self.dp} optimizer files are present")
        self.index: dict[str, tuple[int, int, int, torch.Size]] = {}  # name -> group, offset, part, shape
        for g, shapes in enumerate(self.model_states["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                part = math.ceil(torch.Size(shape).numel() / self.dp)
                self.index[name] = (g, offset, part, torch.Size(shape))
                offset += part
            have = self._flat(0, g, "fp32").numel()
            if have != offset:
                raise ValueError(f"{files[0]}: group {g} holds {have} elements, its parameters need {offset}")

    def _flat(self, d: int, group: int, key: str) -> torch.Tensor:
        sd = self._optim[d]
        if key == "fp32":
            return sd["fp32_flat_groups"][group]
        state = sd["optimizer_state_dict"]["state"]
        if group not in state or key not in state[group]:
            # saved before the first optimizer step: Adam creates its moments as zeros on that step
            return torch.zeros_like(sd["fp32_flat_groups"][group])
        return state[group][key]

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        """Parameter `name`'s full fp32 value (`key`="fp32") or Adam moment, as this TP rank holds it."""
        group, offset, part, shape = self.index[name]
        pieces = [self._flat(d, group, key)[offset:offset + part] for d in range(self.dp)]
        out = torch.cat(pieces)[:shape.numel()].view(shape)  # cat copies: nothing refers to the mapping
        self._read += out.numel() * out.element_size()
        if self._read > self._window:
            del pieces
            self._optim = [mmap_load(f)["optimizer_state_dict"] for f in self._files]
            self._read = 0
        return out

    def optimizer_step(self) -> int:
        step = self._optim[0]["optimizer_state_dict"]["state"].get(0, {}).get("step", 0)
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    def param_groups(self) -> list[dict[str, Any]]:
        """Hyper-parameters of each optimizer group (no tensors), JSON-safe."""
        out = []
        for group in self._optim[0]["optimizer_state_dict"]["param_groups"]:
            out.append({k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in group.items() if k != "params"})
        return out

    def loss_scaler(self) -> dict[str, Any]:
        scaler = self._optim[0].get("loss_scaler")
        fields = vars(scaler) if scaler is not None else {}
        return {k: v for k, v in fields.items() if isinstance(v, (int, float, bool, str))}
