"""Every kind of checkpoint read through one interface: full single-device tensors, one at a time.

* `DeepSpeedSource`: a DeepSpeed checkpoint of any (dp, tp). ZeRO 1-3 files are read lazily per parameter
  (`zero_reader.ZeroReader` per TP rank), optimizer state included, and TP slices joined along each
  parameter's split dimension (`pretrain.parallelize.tp_split_dims`); ZeRO-0 checkpoints fall back to
  DeepSpeed's own consolidation (weights only, whole model in memory; under bf16/fp16 the fp32 masters,
  `zero0_masters`).
* `UniversalSource`: our layout-free folder (`universal.json` + `fp32|exp_avg|exp_avg_sq.safetensors`).
* `WeightsSource`: a `pretrain convert --to safetensors` export (`config.json` + `model.safetensors`).

`open_source(path)` picks the kind. Names, shapes and TP split dims come from the single-device model
built on the meta device from the checkpoint's own config, so no layout is baked into any format.
"""

from __future__ import annotations

import base64
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import tp_split as checkpoint_tp
from pretrain.checkpoint.model_build import build_model, load_tokenizer  # noqa: F401 -- re-exported
from pretrain.checkpoint.tensor_files import IntegrityError, file_sha256, verify_manifest
from pretrain.config import Config, config_from_dict

UNIVERSAL_META = "universal.json"
WEIGHTS_CONFIG = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
ZERO_STAGES_WITH_OPTIMIZER = (1, 2, 3)
"""ZeRO stages whose partitioned optimizer files `zero_reader` reads (ZeRO-0 keeps DeepSpeed's whole optimizer
inside the model-states file, in the order of the optimizer's parameter groups, not by name)."""


def param_layout(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {"shape", "tp_split_dim"} for every parameter, in module order."""
    from pretrain.parallelize import tp_split_dims

    dims = tp_split_dims(model)
    return {n: {"shape": list(p.shape), "tp_split_dim": dims[n]} for n, p in model.named_parameters()}


class Source:
    """Base: subclasses set `meta` (config dict, tokenizer, step, ...) and implement `tensor`."""

    meta: dict[str, Any]
    has_optimizer = False
    path: Path

    @cached_property
    def config(self) -> Config:
        return config_from_dict(self.meta["config"])

    @cached_property
    def layout(self) -> dict[str, dict[str, Any]]:
        if "params" in self.meta:
            return self.meta["params"]
        return param_layout(build_model(self.config, self.meta["tokenizer"], "meta",
                                        classnames=self.meta.get("classnames")))

    @property
    def names(self) -> list[str]:
        return list(self.layout)

    @property
    def frozen(self) -> set[str]:
        """Parameters trained frozen (`train.freeze`): weights only, no optimizer state to read."""
        return set(self.meta.get("frozen") or [])

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All fp32 weights (loads the whole model: for eval and exporters, not for conversion)."""
        return {n: self.tensor(n) for n in self.names}

    def client_state(self) -> dict[str, Any]:
        """What training resumes from besides the tensors: step, config, tokenizer, data positions, RNG."""
        state = dict(self.meta)
        if isinstance(state.get("rng"), str):
            state["rng"] = torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8)
        return state


class DeepSpeedSource(Source):
    def __init__(self, path: str | Path, tag: str | None = None) -> None:
        target = ckpt.resolve(str(path), Path(path) / "checkpoints")
        if target is None:
            raise FileNotFoundError(f"{path}: no checkpoint found")
        self.root, self.tag = target[0], tag or target[1]
        self.path = self.root / self.tag
        ckpt.verify_marker(self.path)
        ckpt.check_loadable(sorted(self.path.glob("*.pt")))  # a file holding code is refused, named, unrun
        self.tp_ranks = checkpoint_tp.tp_ranks_in(self.path)
        client = ckpt.read_client_state(self.root, self.tag)
        self.meta = dict(client)
        self.meta["tp"] = len(self.tp_ranks)
        self.meta["source_sha256"] = self.fingerprint(self.path)
        if isinstance(self.meta.get("rng"), torch.Tensor):
            self.meta["rng"] = base64.b64encode(self.meta["rng"].numpy().tobytes()).decode()
        self.stage = int(self.config.parallel.zero_stage)
        self.has_optimizer = self.stage in ZERO_STAGES_WITH_OPTIMIZER
        self._whole: dict[str, torch.Tensor] | None = None

    @staticmethod
    def fingerprint(tag_dir: Path) -> str | None:
        """sha256 of the checkpoint's completion marker (which lists every file's sha256): tells a copy made
        from this checkpoint from one of an earlier save of the same tag. None for plain DeepSpeed folders."""
        marker = Path(tag_dir) / ckpt.MARKER
        return file_sha256(marker) if marker.is_file() else None

    @cached_property
    def readers(self) -> list[Any]:
        from pretrain.checkpoint.zero_reader import ZeroReader

        readers = [ZeroReader(self.path, t) for t in self.tp_ranks]
        r0 = readers[0]
        self.meta.update({
            "optimizer_step": r0.optimizer_step(), "param_groups": r0.param_groups(),
            "loss_scaler": r0.loss_scaler(), "lr_scheduler": r0.model_states.get("lr_scheduler"),
            "global_samples": int(r0.model_states.get("global_samples", 0)),
            "skipped_steps": int(r0.model_states.get("skipped_steps", 0)),
        })
        return readers

    @property
    def frozen(self) -> set[str]:
        if not self.has_optimizer:  # ZeRO-0: DeepSpeed's consolidation reads weights only anyway
            return set()
        return set(self.readers[0].frozen_shapes) & set(self.layout)

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        entry = self.layout.get(name)
        if entry is None:
            raise KeyError(f"{self.path}: the model has no parameter {name!r}")
        if not self.has_optimizer:
            if key != "fp32":
                raise ValueError(f"{self.path}: optimizer state is read from ZeRO stage 1-3 checkpoints only "
                                 f"(this one is stage {self.stage})")
            if self._whole is None:
                full = {n: torch.Size(e["shape"]) for n, e in self.layout.items()}
                self._whole = checkpoint_tp.consolidate(self.root, self.tag, full,
                                                        ckpt.consolidated_state_dict)
            return self._whole[name]
        slices = [r.tensor(name, key) for r in self.readers]
        dim = entry["tp_split_dim"]
        out = slices[0] if dim is None or len(slices) == 1 else torch.cat(slices, dim=dim)
        if list(out.shape) != entry["shape"]:
            raise ValueError(f"{self.path}: {name} has shape {tuple(out.shape)} after joining "
                             f"{len(slices)} TP slices; the model needs {tuple(entry['shape'])}")
        return out


class _SafetensorsFiles:
    """Lazily opened safetensors files of a folder, by file stem."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._open = folder, {}

    def get(self, stem: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if stem not in self._open:
            path = self.folder / f"{stem}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing")
            self._open[stem] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[stem].get_tensor(name)


class UniversalSource(Source):
    has_optimizer = True

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        if verify:
            verify_manifest(self.path)
        self.meta = json.loads((self.path / UNIVERSAL_META).read_text())
        if self.meta.get("format") != "mmpt-universal":
            raise ValueError(f"{self.path / UNIVERSAL_META}: not an mmpt universal checkpoint")
        self.meta["tokenizer"] = (self.path / "tokenizer.json").read_text()  # the run's own, on resume too
        self._files = _SafetensorsFiles(self.path)

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        if key != "fp32" and name in self.frozen:  # trained frozen: no moments were written
            return torch.zeros(self.layout[name]["shape"])  # what Adam starts from, should it train now
        return self._files.get(key, name)


class WeightsSource(Source):
    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        if verify:
            verify_manifest(self.path)
        self.meta = json.loads((self.path / WEIGHTS_CONFIG).read_text())
        self._files = _SafetensorsFiles(self.path)

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        if key != "fp32":
            raise ValueError(f"{self.path}: a weights export holds no optimizer state")
        return self._files.get(Path(WEIGHTS_FILE).stem, name).float()


class DictSource(Source):
    """In-memory weights (imports from HF/open_clip) presented as a source for `write_weights`."""

    def __init__(self, state: dict[str, torch.Tensor], meta: dict[str, Any], origin: str) -> None:
        self.state, self.meta, self.path = state, meta, Path(origin)
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"{origin}: lacks {len(missing)} parameters of the model, e.g. {missing[:3]}")

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        if key != "fp32":
            raise ValueError(f"{self.path}: imported weights hold no optimizer state")
        return self.state[name].float()


def is_universal(path: str | Path) -> bool:
    return (Path(path) / UNIVERSAL_META).is_file()


def is_weights(path: str | Path) -> bool:
    p = Path(path)
    if not ((p / WEIGHTS_FILE).is_file() and (p / WEIGHTS_CONFIG).is_file()):
        return False
    try:
        return json.loads((p / WEIGHTS_CONFIG).read_text()).get("format") == "mmpt-weights"
    except json.JSONDecodeError:
        return False


WEIGHTS_ONLY = {"weights": "a weights export", "hf": "a Hugging Face CLIP model folder",
                "open_clip": "an open_clip model folder", "onnx": "an ONNX export"}
"""What `weights_only_kind` names, in words (the refusals of open_source and of --resume / --init-from)."""


def weights_only_kind(path: str | Path) -> str | None:
    """What a folder holding a model's weights but no training state is: "weights" (`convert --to
    safetensors`, or an import), "hf", "open_clip" or "onnx" (our exports, or a transformers / open_clip
    model folder); None for anything else. `--resume` names the way such a folder can be started from."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_weights(p):
        return "weights"
    try:
        kind = json.loads((p / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in ("weights", "hf", "open_clip", "onnx"):
        return kind
    if (p / "open_clip_config.json").is_file():
        return "open_clip"
    try:
        hf = json.loads((p / WEIGHTS_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return "hf" if isinstance(hf, dict) and hf.get("model_type") == "clip" else None


def check_output_path(src: str | Path, dst: str | Path) -> None:
    """Refuse (ValueError naming both) an output folder that is the source or a folder holding it: the
    output replaces DST (`--overwrite`) once it is complete, which would delete the input it was made from
    (a run directory, with its checkpoints and metrics, for `convert RUN/checkpoints/TAG RUN`). Checked
    against SRC as given and the checkpoint folder a run directory or checkpoint root resolves to, before
    anything is read or written. An output inside the source (`convert RUN RUN/hf`) is fine."""
    out = Path(dst).resolve()
    inputs = [Path(src)]
    try:
        found = ckpt.resolve(str(src), Path(src) / "checkpoints")
    except (OSError, ValueError):  # not a DeepSpeed checkpoint: SRC itself is what is read
        found = None
    if found is not None:
        inputs.append(found[0] / found[1])
    for given in inputs:
        read = given.resolve()
        if read == out or out in read.parents:
            where = "is" if read == out else "contains"
            via = f" (what SRC {src} resolves to)" if given != Path(src) else ""
            raise ValueError(f"output {dst} {where} the source {given}{via}: writing it would replace "
                             "and delete the input; choose an output folder that is not the source and does "
                             "not hold it")


def open_source(path: str | Path, tag: str | None = None) -> Source:
    """The right reader for `path`: universal folder, weights export, or DeepSpeed checkpoint/run dir. HF,
    open_clip and ONNX folders are outputs, not read here: refused naming `pretrain convert --from`."""
    if is_universal(path):
        return UniversalSource(path)
    if is_weights(path):
        return WeightsSource(path)
    try:
        return DeepSpeedSource(path, tag)
    except IntegrityError:
        raise
    except FileNotFoundError as e:
        kind = weights_only_kind(path)
        if kind in ("hf", "open_clip", "onnx"):  # an export (ours or anyone's): say what reads it
            what = WEIGHTS_ONLY[kind]
            how = ("it is for inference only: use the checkpoint or weights export it was exported from"
                   if kind == "onnx" else f"import it first with `pretrain convert --from {kind} {path} DST` "
                   "and give DST (a weights export) instead")
            raise FileNotFoundError(f"{path}: {what}, which is not read directly as a checkpoint (only "
                                    f"DeepSpeed checkpoints, universal checkpoints and weights exports "
                                    f"are); {how}") from None
        raise FileNotFoundError(f"{path}: not a DeepSpeed checkpoint, universal checkpoint "
                                f"({UNIVERSAL_META}) or weights export ({WEIGHTS_FILE}): {e}") from None


def refuse_classifier(cfg: Config, path: str | Path) -> None:
    """ValueError for a fine-tuned classifier (`train.task=classify`: an image tower and a class head, no text
    tower), which the CLIP encoders of embed / eval --suite / ONNX / HF / open_clip cannot be built from:
    say so, and what reads it, instead of "does not match the model: missing logit_scale, ...". Plain
    `pretrain eval` does read it (`pretrain.evaluation.classifier_eval`) and never gets here."""
    if cfg.train.task == "classify":
        raise ValueError(f"{path}: a fine-tuned classifier (train.task=classify: image tower + class head, "
                         "no text tower), which this command does not read (it needs a CLIP model); "
                         f"`pretrain eval --checkpoint {path} --data SHARDS` scores its accuracy (top-1, "
                         "top-5, loss), as the fine-tune's validation and `--wise-ft` do, and "
                         "`pretrain convert --to safetensors|universal|onnx` exports it")
