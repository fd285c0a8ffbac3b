"""Read one tensor-parallel rank's DeepSpeed ZeRO 1-3 files parameter by parameter, memory-mapped.

Each data-parallel rank d stores one flat fp32 tensor per optimizer parameter group (and one flat
`exp_avg` / `exp_avg_sq` each); a parameter's full (TP-local) value is the concatenation, in DP-rank order,
of its fragments on the ranks that hold any of it:

* ZeRO-3 partitions every parameter: rank d holds `ceil(numel / dp)` elements of each (the last rank's
  slice zero-padded), at offset `off_i` = the sum of earlier parts; names and shapes in order come from
  `param_shapes` in the model-states file.
* ZeRO 1-2 partition the flattened group (parameters in order, alignment-padded) into equal contiguous
  ranges, so a parameter lies on one or a few neighbouring ranks; each rank's file records where
  (`param_slice_mappings`: name -> (numel, start) within its partition).

Frozen parameters (`train.freeze`, `requires_grad=False`) are in no optimizer group, so they have no
fp32 master and no moments; DeepSpeed keeps their working-precision values in the model-states files:
ZeRO-3 each DP rank's `ds_tensor` partition (`frozen_param_fragments`, same ceil(numel / dp) cut, names and
shapes in `frozen_param_shapes`), ZeRO-2 the whole tensor there, ZeRO-1 only the module's state dict.

Files are opened memory-mapped and weights-only (`checkpoint.weights_only.mmap_load`): slicing reads only
the pages of the one parameter asked for, so converting a checkpoint needs memory for a few parameters, not
the model, and nothing is unpickled beyond tensors, containers and DeepSpeed's allow-listed records.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.weights_only import mmap_load

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_DP = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # bf16 runs prefix "bf16_"
# where each stage keeps the flat fp32 partitions and the wrapped torch optimizer's state dict
_FLAT = {3: "fp32_flat_groups", 1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups"}
_BASE = {3: "optimizer_state_dict", 1: "base_optimizer_state", 2: "base_optimizer_state"}


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


def _stage(sd: dict[str, Any]) -> int:
    value = sd.get("zero_stage", 0)
    return int(getattr(value, "value", value))


class ZeroReader:
    """Full (TP-local) tensors of one TP rank of a ZeRO 1-3 checkpoint, read lazily from all DP ranks."""

    def __init__(self, tag_dir: Path, tp_rank: int = 0, window_mb: int = 64) -> None:
        self.tag_dir = Path(tag_dir)
        files = optim_files(self.tag_dir, tp_rank)
        self.dp, self._files = len(files), files
        states = [self.tag_dir / f"{p}mp_rank_{tp_rank:02d}_model_states.pt" for p in ("zero_pp_rank_0_", "")]
        self.model_states = mmap_load(next((f for f in states if f.is_file()), states[0]))  # ZeRO-3, ZeRO 1-2
        self._optim = [mmap_load(f)["optimizer_state_dict"] for f in files]
        # Pages read through a mapping stay resident (and count in RSS) while it is open: re-map after
        # every window read so a conversion's footprint stays bounded whatever the model's size (the
        # window grows with the largest parameter so re-mapping stays rare for huge tensors).
        largest = max((torch.Size(s).numel() for g in self.model_states["param_shapes"] for s in g.values()),
                      default=0)
        self._window, self._read = max(window_mb << 20, 2 * 4 * largest), 0
        first = self._optim[0]
        self.stage = _stage(first)
        if self.stage not in _FLAT:
            raise ValueError(f"{self.tag_dir}: ZeRO stage {self.stage} checkpoint; layout conversion reads "
                             "ZeRO stages 1-3 (parallel.zero_stage=1, 2 or 3)")
        counts = first.get("partition_count", self.dp)
        if any(int(c) != self.dp for c in (counts if isinstance(counts, list) else [counts])):
            raise ValueError(f"{self.tag_dir}: written by {counts} DP ranks but {self.dp} optimizer files "
                             "are present")
        # name -> (group, shape, [(dp rank, start, numel) of its fragments in DP-rank order])
        self.index: dict[str, tuple[int, torch.Size, list[tuple[int, int, int]]]] = {}
        for g, shapes in enumerate(self.model_states["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                shape = torch.Size(shape)
                if self.stage == 3:
                    part = math.ceil(shape.numel() / self.dp)
                    frags = [(d, offset, part) for d in range(self.dp)]
                    offset += part
                else:
                    frags = [(d, int(m.start), int(m.numel)) for d, sd in enumerate(self._optim)
                             if (m := sd["param_slice_mappings"][g].get(name)) is not None]
                self.index[name] = (g, shape, frags)
            have = self._flat(0, g, "fp32").numel()
            if self.stage == 3 and have != offset:
                raise ValueError(f"{files[0]}: group {g} holds {have} elements, its parameters need {offset}")

    @cached_property
    def frozen_shapes(self) -> dict[str, torch.Size]:
        """Frozen parameters (no optimizer state) -> full (TP-local) shape."""
        ms = self.model_states
        if ms.get("frozen_param_shapes"):  # ZeRO 2-3
            return {n: torch.Size(s) for n, s in ms["frozen_param_shapes"].items() if n not in self.index}
        module = ms.get("module") or {}  # ZeRO-1: the whole module; its parameters outside every group
        names = set(ms.get("buffer_names") or [])
        return {n: t.shape for n, t in module.items() if n not in self.index and n not in names}

    def _frozen(self, name: str) -> torch.Tensor:
        """A frozen parameter's whole (TP-local) value, in the working precision it was trained in."""
        shape = self.frozen_shapes[name]
        if self.stage == 3:  # every DP rank's model-states file holds its ds_tensor partition
            pieces = [frags[name].reshape(-1) for frags in self._frozen_fragments]
            return torch.cat(pieces)[:shape.numel()].view(shape)
        fragments = self.model_states.get("frozen_param_fragments") or self.model_states["module"]
        return fragments[name].clone().view(shape)

    @cached_property
    def _frozen_fragments(self) -> list[dict[str, torch.Tensor]]:
        """ZeRO-3: each DP rank's frozen partitions (its model-states file, memory-mapped), in DP order."""
        tp = int(_DP.search(self._files[0].name).group(2))
        files = [self.tag_dir / f"zero_pp_rank_{d}_mp_rank_{tp:02d}_model_states.pt" for d in range(self.dp)]
        return [mmap_load(f)["frozen_param_fragments"] for f in files]

    def _flat(self, d: int, group: int, key: str) -> torch.Tensor:
        sd = self._optim[d]
        if key == "fp32":
            return sd[_FLAT[self.stage]][group]
        state = sd[_BASE[self.stage]]["state"]
        if group not in state or key not in state[group]:
            # saved before the first optimizer step: Adam creates its moments as zeros on that step
            return torch.zeros_like(sd[_FLAT[self.stage]][group])
        return state[group][key]

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        """Parameter `name`'s full fp32 value (`key`="fp32") or Adam moment, as this TP rank holds it.
        A frozen parameter has its value only (as fp32; KeyError for a moment: it has none)."""
        if name not in self.index and name in self.frozen_shapes:
            if key != "fp32":
                raise KeyError(f"{self.tag_dir}: {name} was frozen (train.freeze): it has no {key}")
            return self._frozen(name).float()
        group, shape, frags = self.index[name]
        pieces = [self._flat(d, group, key)[start:start + n] for d, start, n in frags]
        out = torch.cat(pieces)[:shape.numel()]  # cat copies: nothing refers to the mapping
        if out.numel() != shape.numel():
            raise ValueError(f"{self.tag_dir}: {name} has {out.numel()} of its {shape.numel()} elements in "
                             "the optimizer-state files")
        out = out.view(shape)
        self._read += out.numel() * out.element_size()
        if self._read > self._window:
            del pieces
            self._optim = [mmap_load(f)["optimizer_state_dict"] for f in self._files]
            self._read = 0
        return out

    def _base(self) -> dict[str, Any]:
        return self._optim[0][_BASE[self.stage]]

    def optimizer_step(self) -> int:
        step = self._base()["state"].get(0, {}).get("step", 0)
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    def param_groups(self) -> list[dict[str, Any]]:
        """Hyper-parameters of each optimizer group (no tensors), JSON-safe."""
        out = []
        for group in self._base()["param_groups"]:
            out.append({k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in group.items() if k != "params"})
        return out

    def loss_scaler(self) -> dict[str, Any]:
        scaler = self._optim[0].get("loss_scaler")
        fields = vars(scaler) if scaler is not None else {}
        return {k: v for k, v in fields.items() if isinstance(v, (int, float, bool, str))}
