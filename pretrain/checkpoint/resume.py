"""Where a run starts: fresh; a DeepSpeed checkpoint (at its own layout: DeepSpeed loads it; at another
one: through its universal copy, written on the way if there is none yet); a universal checkpoint of any
layout; or another model's weights (`--init-from`: imports, exports, checkpoints) with a fresh optimizer.
`--init-from` a dual encoder (`model.fusion.layers=0`) into the same towers with a fusion encoder added
loads the towers and leaves the fusion encoder and its heads at this run's own initialisation (BLIP-2's
recipe: a fusion stage on pretrained, often frozen, towers).

`resolve_start` runs once the process groups exist but before the model does (it supplies the tokenizer,
refuses a config that does not fit the checkpoint, and converts a checkpoint of another layout: rank 0
writes, the others wait); `StartPoint.load` runs once the engine exists and returns the step and data
positions to continue from. The checkpoint supplies the position, this run's config the optimizer's
hyper-parameters and schedule (`hparams`: `optim.lr=X --resume latest` trains at X, at any layout).
Universal checkpoints also get written here, next to each DeepSpeed save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from parallel import groups
from parallel.consensus import failures_by_rank, on_rank0
from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import hparams
from pretrain.checkpoint import universal as universal_io
from pretrain.checkpoint.sources import (
    UNIVERSAL_META,
    WEIGHTS_ONLY,
    DeepSpeedSource,
    Source,
    UniversalSource,
    is_universal,
    open_source,
    weights_only_kind,
)
from pretrain.checkpoint.tags import UNIVERSAL, is_save_name, prune_universal_copies, save_key
from pretrain.checkpoint.tensor_files import MANIFEST, write_text_atomic
from pretrain.checkpoint.universal_load import load_full_tensors, load_universal
from pretrain.config import Config, ConfigError, ModelConfig, config_from_dict

log = logging.getLogger("mmpt.train")
KERNEL_SWITCHES = ("attention", "fused_layernorm")
"""model.* keys that choose kernels, not weights: a checkpoint resumes under either setting."""
FRESH_PREFIXES = ("fusion.", "itm_head.", "mlm_head.")
"""What a fusion model may hold that the dual encoder it starts from (`--init-from`) lacks: the fusion
encoder, the ITM head and the (conditioned) MLM head start from this run's initialisation."""


def _architecture(model: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in KERNEL_SWITCHES}


def adds_fusion(source: ModelConfig, model: ModelConfig) -> bool:
    """True when `model` is `source`'s dual encoder with a fusion encoder added (every other model key the
    same): `--init-from` then loads the towers and leaves the fusion part fresh."""
    a, b = _architecture(source), _architecture(model)
    return a.pop("fusion")["layers"] == 0 and b.pop("fusion")["layers"] > 0 and a == b


@dataclasses.dataclass
class StartPoint:
    universal: UniversalSource | None = None
    target: tuple[Path, str] | None = None  # DeepSpeed checkpoint root and tag
    init: Source | None = None
    init_adds_fusion: bool = False  # `--init-from` a dual encoder: the fusion part starts fresh
    client: dict[str, Any] | None = None  # step, config, tokenizer, data positions, RNG of a resume
    rollback: tuple[Path, str] | None = None  # (root, tag) resumed from in this run's root: `load` notes it
    # (key, checkpoint's, this run's) of the optimizer/schedule keys this resume takes from this run
    changed: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)

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

    def _fresh(self, engine: Any) -> frozenset[str]:
        """Names of the fusion parameters a dual-encoder `--init-from` source lacks (none otherwise)."""
        if not self.init_adds_fusion:
            return frozenset()
        fresh = {n: p for n, p in engine.module.named_parameters() if n not in self.init.layout}
        other = [n for n in fresh if not n.startswith(FRESH_PREFIXES)]
        if other:  # a tower parameter missing: the source is not this model's dual encoder
            raise ValueError(f"--init-from {self.init.path}: has no tensors for {len(other)} parameters "
                             f"outside the fusion part, e.g. {other[:3]}")
        frozen = [n for n, p in fresh.items() if not p.requires_grad]
        if frozen:
            raise ConfigError(f"train.freeze: freezes {frozen[:3]}, which --init-from {self.init.path} "
                              "lacks: they would stay at their random initialisation")
        return frozenset(fresh)

    def load(self, engine: Any) -> tuple[int, Any]:
        """Put the start state into `engine`; return (start step, saved data positions or None). A rollback
        is noted (`_note_rollback`) only once every rank has loaded: a load that fails (a file failing its
        hash check) leaves `latest` and the save order as they were, so `--resume latest` still takes the
        newest save."""
        if self.rollback is None:
            self._load(engine)
        else:
            error: Exception | None = None
            try:
                self._load(engine)
            except Exception as e:  # every rank reaches the agreement below, whatever happened to it
                error = e
            failed = failures_by_rank(error)
            if error is not None:
                raise error
            if failed:
                raise RuntimeError(f"loading {self.describe()} failed on {'; '.join(failed)}")
            _note_rollback(*self.rollback)
        if self.client is None:
            return 0, None
        torch.set_rng_state(self.client["rng"])
        step = int(self.client["step"])
        log.info("resumed from %s at step %d", self.describe(), step)
        if groups.rank() == 0:
            for key, was, now in self.changed:
                log.info("%s: checkpoint %s -> this run %s", key, was, now)
        # every rank's positions: the loader re-deals them if the layout changed
        return step, self.client["data_positions"]

    def _load(self, engine: Any) -> None:
        """The checkpoint's or init weights' tensors (and optimizer state) into `engine`. A resume keeps this
        run's optimizer hyper-parameters (optim.lr x lr_mult, weight decay, betas, eps, the schedule) and
        takes the checkpoint's position (step, schedule position, Adam moments): `hparams`."""
        if self.universal is not None or self.target is not None:
            mine = hparams.snapshot(engine)
            if self.universal is not None:
                load_universal(engine, self.universal)
            else:
                # every rank checks its files (sha256, weights-only), then DeepSpeed loads, never unpickling
                ckpt.load_deepspeed(engine, *self.target)
            hparams.reapply(engine, mine)
        elif self.init is not None:
            fresh = self._fresh(engine)
            load_full_tensors(engine, self.init.tensor, self.init.layout, keys=("fp32",), fresh=fresh)
            log.info("initialised weights from %s (fresh optimizer, step 0)", self.init.path)
            if fresh:
                log.info("%d parameters the source lacks start from this run's initialisation: %s",
                         len(fresh), ", ".join(sorted({n.split(".")[0] + ".*" for n in fresh})))


def open_universal(resume: str) -> UniversalSource | None:
    """The universal checkpoint `resume` names, else None: a folder with universal.json, or a folder of
    them (`checkpoints/universal`): the copy its `latest` names or, when `latest` is missing or names no
    complete copy (a save killed while writing the next one), the most recent complete copy (in the save
    order of the DeepSpeed checkpoints beside the folder, else by step; hidden staging folders, which a kill
    can leave complete but for their name, are no copy: `tags.is_save_name`)."""
    path = Path(resume)
    if is_universal(path):
        return UniversalSource(path)
    named = (path / "latest").read_text().strip() if (path / "latest").is_file() else ""
    if named and is_universal(path / named):
        return UniversalSource(path / named)
    copies = [p for p in path.iterdir() if p.is_dir() and is_save_name(p.name) and is_universal(p)
              and (p / MANIFEST).is_file()] if path.is_dir() else []  # a kill's staging folder never
    if not copies:
        return None
    newest = max(copies, key=lambda p: save_key(path.parent, p.name))
    if named:
        log.warning("%s/latest names %r, which is not a complete universal checkpoint; using %s (the most "
                    "recent complete one)", path, named, newest.name)
    return UniversalSource(newest)


def _refuse_weights_only(resume: str) -> None:
    """`--resume` of a folder that holds weights only: say how to start from it instead (ValueError)."""
    kind = weights_only_kind(resume)
    if kind is None:
        return
    what = WEIGHTS_ONLY[kind]
    if kind == "onnx":
        how = "it is for inference only: resume from the checkpoint it was exported from"
    elif kind == "weights":
        how = f"start a run from its weights (a fresh optimizer at step 0) with `--init-from {resume}`"
    else:
        how = (f"import it with `pretrain convert --from {kind} {resume} DST` and start a run from its "
               "weights (a fresh optimizer at step 0) with `--init-from DST`")
    raise ValueError(f"--resume {resume}: {what} holds a model's weights only, no optimizer state, step or "
                     f"data position, so training cannot resume from it; {how}")


def _refuse_foreign_init(init_from: str) -> None:
    """`--init-from` of an HF / open_clip model folder (ours, `convert --to hf|open_clip`, or anyone's) or an
    ONNX export: not read directly, so say what works (ValueError) instead of "not a checkpoint"."""
    kind = weights_only_kind(init_from)
    if kind not in ("hf", "open_clip", "onnx"):
        return
    if kind == "onnx":
        how = "it is for inference only: start from the checkpoint or weights export it was exported from"
    else:
        how = (f"import it first with `pretrain convert --from {kind} {init_from} DST` and start from "
               "`--init-from DST` (with `--config DST/train.yaml`: the imported model's config)")
    raise ValueError(f"--init-from {init_from}: {WEIGHTS_ONLY[kind]}, which --init-from does not read "
                     f"directly (it takes checkpoints, universal checkpoints and weights exports); {how}")


def _rollback_of(root: Path, resumed: tuple[Path, str] | None) -> tuple[Path, str] | None:
    """(root, tag) when the resume from `resumed` (checkpoint root, tag) is from this run's own checkpoint
    folder, which then may be a rollback; None for another run's checkpoints (nothing to reorder)."""
    if resumed is None or Path(resumed[0]).resolve() != Path(root).resolve():
        return None
    return Path(root), resumed[1]


def _note_rollback(root: Path, tag: str) -> None:
    """A resume from `root/tag`, this run's own checkpoint folder: when that is an earlier save (a rollback),
    rank 0 makes it the most recent save, so that retention and the `latest` fallback follow the new branch
    (`tags.note_resume`, which logs the abandoned checkpoints). Called once the checkpoint has loaded."""
    if groups.rank() != 0:
        return
    try:
        ckpt.note_resume(root, tag)
    except OSError as e:
        log.warning("resuming from %s/%s: could not record it as the most recent save (%s); retention and "
                    "the `latest` fallback count checkpoints saved after it as newer", root, tag, e)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a DeepSpeed checkpoint's files are cut for: data- and tensor-parallel degree, ZeRO stage."""

    dp: int
    tp: int
    zero_stage: int

    def __str__(self) -> str:
        return f"dp={self.dp} tp={self.tp}"

    def ranks(self) -> str:
        n = self.dp * self.tp
        return f"{n} rank{'s' if n > 1 else ''}"


def needs_universal(saved: Layout, now: Layout, resume: str) -> bool:
    """Whether resuming a checkpoint saved at `saved` under `now` must go through its universal copy.

    DeepSpeed loads its own files only into the layout that wrote them, except ZeRO-0's, which hold each TP
    rank's whole optimizer and so load under any DP size. Our universal format reads ZeRO 1-3 files and
    loads into ZeRO 1-3 engines; anything else is refused here, naming the command that works."""
    if saved == now:
        return False
    if saved.zero_stage == now.zero_stage == 0 and saved.tp == now.tp:
        return False
    if 0 in (saved.zero_stage, now.zero_stage):
        ranks = "any number of ranks" if saved.tp == 1 else f"any multiple of {saved.tp} ranks"
        fix = (f"parallel.zero_stage={saved.zero_stage} (any layout)" if saved.zero_stage else
               f"parallel.zero_stage=0 parallel.tp={saved.tp} on {ranks} (e.g. {saved.ranks()}: the saved "
               "layout)")
        raise ConfigError(
            f"--resume {resume}: saved at {saved} with parallel.zero_stage={saved.zero_stage}, resumed at "
            f"{now} with parallel.zero_stage={now.zero_stage}: a resume at another layout or ZeRO stage "
            "needs stages 1-3 on both sides (a ZeRO-0 checkpoint resumes at its own tensor-parallel degree, "
            f"under any number of data-parallel ranks). Resume with {fix}")
    return True


def _regrouped(saved: Config, cfg: Config, resume: str) -> bool:
    """Whether `train.freeze` or `optim.lr_mult` changed since the checkpoint: the optimizer's parameter
    groups differ, so DeepSpeed's own files (flat per group) cannot be loaded; the universal copy, by
    parameter name, can (ZeRO 1-3). A parameter unfrozen now starts with zero Adam moments."""
    if saved.train.freeze == cfg.train.freeze and saved.optim.lr_mult == cfg.optim.lr_mult:
        return False
    if 0 in (saved.parallel.zero_stage, cfg.parallel.zero_stage):
        raise ConfigError(f"--resume {resume}: train.freeze or optim.lr_mult differs from the checkpoint's "
                          f"({saved.train.freeze}, {saved.optim.lr_mult}); changing the optimizer's groups "
                          "at a resume goes through the universal format, which needs parallel.zero_stage "
                          "1-3 on both sides. Resume with the checkpoint's train.freeze and optim.lr_mult")
    return True


def _is_copy_of(dst: Path, fingerprint: str | None) -> bool:
    """Whether `dst` is a complete universal copy of the DeepSpeed checkpoint with `fingerprint` (a tag
    saved again after an earlier resume is another checkpoint; copies written before fingerprints were
    recorded are taken as they are)."""
    if not is_universal(dst):
        return False
    return json.loads((dst / UNIVERSAL_META).read_text()).get("source_sha256", fingerprint) == fingerprint


def _universal_copy(root: Path, tag: str, resume: str, saved: Layout, now: Layout) -> UniversalSource:
    """`<root>/universal/<tag>`, written once by rank 0 (streamed, staged, like `pretrain convert`) unless a
    complete copy of this very checkpoint is there; the other ranks wait. A failure raises on every rank."""
    dst = root / "universal" / tag
    t0 = time.perf_counter()

    def copy() -> str:
        if _is_copy_of(dst, DeepSpeedSource.fingerprint(root / tag)):
            return "reused"
        out = universal_io.write_universal(DeepSpeedSource(root, tag), dst, overwrite=True)
        return f"converted ({out['bytes'] / 1e6:.1f} MB)"

    done, error = on_rank0(copy)  # the others wait, polling: a long conversion outlasts no timeout
    failed = failures_by_rank(error)
    if failed:
        raise ValueError(f"--resume {resume}: writing the universal copy {dst} of {root}/{tag} (saved at "
                         f"{saved}, resumed at {now}) failed on {'; '.join(failed)}; convert it with "
                         f"`pretrain convert {root / tag} DST --to universal` and `--resume DST`, or resume "
                         f"at the saved layout (parallel.tp={saved.tp} on {saved.ranks()})")
    if groups.rank() == 0:
        log.info("resuming %s/%s from layout %s to %s (ZeRO %d -> %d) through its universal copy %s: %s in "
                 "%.1f s", root, tag, saved, now, saved.zero_stage, now.zero_stage, dst, done,
                 time.perf_counter() - t0)
    return UniversalSource(dst)


def resolve_start(cfg: Config, root: Path, resume: str | None, init_from: str | None) -> StartPoint:
    """Find the checkpoint (or weights) to start from and check it fits `cfg`; a DeepSpeed checkpoint of
    another layout is switched to its universal copy (written now if needed: a collective, so every rank
    calls this after the process groups exist). No tensor is loaded into a model yet."""
    start = StartPoint()
    resumed: tuple[Path, str] | None = None  # the DeepSpeed checkpoint (root, tag) resumed from, if any
    if resume:
        start.universal = open_universal(resume)  # layout-free: any (dp, tp) resumes it
        if start.universal is not None:
            start.client = start.universal.client_state()
            copy = start.universal.path
            named = Path(resume).resolve() == copy.resolve()  # a tag the user named, not a folder's latest
            resumed = (copy.parent.parent, copy.name) if copy.parent.name == UNIVERSAL and named else None
        else:
            _refuse_weights_only(resume)
            start.target = ckpt.resolve(resume, root)
            # a rollback only when the user named the tag: `latest` naming an older tag than the newest save
            # is a save killed before it moved `latest`, and that newest save must not be aged out
            if start.target and Path(resume).resolve() == (Path(start.target[0]) / start.target[1]).resolve():
                resumed = start.target
            start.client = ckpt.read_client_state(*start.target) if start.target else None
    if start.client is not None:
        saved = config_from_dict(start.client["config"])
        start.changed = hparams.changed_keys(saved, cfg)
        if _architecture(saved.model) != _architecture(cfg.model) or saved.objectives != cfg.objectives:
            raise ConfigError(f"--resume {resume}: model or objectives config differs from the checkpoint's; "
                              "resume with the same model.* and objectives.* settings")
        if start.target is not None and start.client.get("dp_world") is not None:
            was = Layout(int(start.client["dp_world"]), int(start.client["tp"]), saved.parallel.zero_stage)
            now = Layout(groups.dp_world_size(), cfg.parallel.tp, cfg.parallel.zero_stage)
            if needs_universal(was, now, resume) or _regrouped(saved, cfg, resume):
                start.universal = _universal_copy(*start.target, resume, was, now)
                start.target, start.client = None, start.universal.client_state()
    elif init_from:
        _refuse_foreign_init(init_from)
        start.init = open_source(init_from)
        start.init_adds_fusion = adds_fusion(start.init.config.model, cfg.model)
        if _architecture(start.init.config.model) != _architecture(cfg.model) and not start.init_adds_fusion:
            raise ConfigError(f"--init-from {init_from}: its model config differs from this run's; train "
                              f"with its config (`--config {Path(init_from) / 'train.yaml'}` for imports) or "
                              "the same model.* settings (a dual encoder may also gain a fusion encoder: "
                              "model.fusion.layers > 0 with every other model.* key the same)")
    start.rollback = _rollback_of(root, resumed)  # noted by `start.load`, once the checkpoint has loaded
    return start


def save_universal(root: Path, tag: str) -> None:
    """Also write the just-published checkpoint as `<root>/universal/<tag>` (rank 0 converts, reading the
    files back parameter by parameter; the others wait). Retention follows the DeepSpeed checkpoints: only
    once the new copy is complete and `universal/latest` names it (replaced atomically) are the copies of
    the checkpoints retention removed deleted (`tags.prune` leaves the one `latest` named until then), so a
    kill or a full disk while the copy streams leaves the previous copy and a `latest` naming it.

    A failure on rank 0 raises CheckpointSaveError on every rank (the DeepSpeed checkpoint stays). The
    others wait by polling (`on_rank0`), so a conversion longer than `parallel.timeout_s` is fine."""

    def convert() -> None:
        out = universal_io.write_universal(DeepSpeedSource(root, tag), root / UNIVERSAL / tag, overwrite=True)
        write_text_atomic(root / UNIVERSAL / "latest", tag)
        removed = prune_universal_copies(root)
        log.info("saved universal checkpoint %s (%.1f MB in %.1f s)%s", out["out"], out["bytes"] / 1e6,
                 out["seconds"], f"; removed the copies {removed}" if removed else "")

    _, error = on_rank0(convert)
    failed = failures_by_rank(error)
    if failed:
        raise ckpt.CheckpointSaveError(f"writing the universal copy of {root}/{tag} failed on "
                                       f"{'; '.join(failed)}; the DeepSpeed checkpoint {tag} is saved")
