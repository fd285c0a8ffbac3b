"""Non-finite guard: a NaN/inf loss never reaches the weights; too many in a row stop the run naming the step
and the objective, rather than training on garbage or hanging.

Two modes, chosen by what the optimizer can do for us:

- **deferred** (ZeRO 1-3, every precision): nothing is read in a healthy step. Each micro-batch's losses
  are checked on the device (`isfinite`, no read) and the loss handed to backward is multiplied by 1 when
  they are finite (bit-identical) and by NaN when not, so that every gradient of that micro-batch is
  non-finite whatever the loss's own gradient was (a NaN added as a constant has a finite gradient; NaN
  times anything, zero included, is NaN). The gradient reduction spreads the NaN to every data-parallel
  rank and DeepSpeed's ZeRO optimizers skip the step when the gradient norm is not finite (stage 3: always;
  stages 1-2: `compute_grad_norm`, on by default, or the bf16/fp16 overflow check), on every rank, with
  `engine.skipped_steps` counting it; that is DeepSpeed's own read inside `engine.step`, not ours. The
  flags are all-reduced and read at log steps (`review`), where the skipped micro-batches are counted,
  named in a warning, and `train.nonfinite_patience` is checked. What changed against the synchronous
  mode: a non-finite micro-batch now skips the whole optimizer step it belongs to (like an fp16
  overflow) instead of being replaced by the next micro-batch, and the patience stop comes at the next
  log step (the weights are safe meanwhile: every step in between is skipped or clean).
- **synchronous** (ZeRO 0: a plain torch optimizer has no overflow skip for fp32 / bf16_autocast): every
  micro-batch's loss is read and all-reduced (`forward_ok`), a non-finite one is dropped on every rank
  before backward and replaced by the next one, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.consensus import any_rank

log = logging.getLogger("mmpt.train")
LOSS_KEYS = ("loss", "loss_contrastive", "loss_mim", "loss_mlm", "loss_itm")
"""The objectives the training loop sums, averages over ranks and logs (each only when the model returns
it): adding a key here is all a new objective needs to appear in metrics.jsonl and TensorBoard."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients; the message names the step and objective."""


def nonfinite_objectives(out: dict[str, torch.Tensor]) -> list[str]:
    """Names of the objectives whose loss is NaN or inf in this micro-batch (reads the device)."""
    bad = [k for k in LOSS_KEYS if k != "loss" and k in out and not torch.isfinite(out[k]).all()]
    if not bad and not torch.isfinite(out["loss"]).all():
        bad = ["loss"]
    return bad


def defers_to_optimizer(zero_stage: int) -> bool:
    """True where DeepSpeed's optimizer skips a step whose gradient norm is not finite in every precision
    (ZeRO 1-3, see the module docstring), so the guard can defer its read to log steps."""
    return zero_stage >= 1


@dataclass
class MicroRecord:
    """One micro-batch of the current log window: its step and its losses on the device (not read)."""

    step: int
    keys: tuple[str, ...]
    """The losses this micro-batch has (FLIP's unmasked tail drops loss_mim from the step it starts)."""
    values: torch.Tensor
    """fp32 [len(keys)]: the losses in `keys` order."""
    ok: torch.Tensor
    """int32 [] on the device: 1 when every loss is finite on this rank."""


@dataclass
class Window:
    """The micro-batches since the last log step, kept on the device until `read`."""

    keys: list[str] = field(default_factory=list)
    micro: list[MicroRecord] = field(default_factory=list)

    def add(self, out: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Record `out`'s losses without reading them; return the on-device finite flag."""
        keys = tuple(k for k in LOSS_KEYS if k in out)
        self.keys = [k for k in LOSS_KEYS if k in keys or k in self.keys]  # all seen, in LOSS_KEYS order
        values = torch.stack([out[k].detach().float().reshape(()) for k in keys])
        ok = torch.isfinite(values).all().to(torch.int32)
        self.micro.append(MicroRecord(step, keys, values, ok))
        return ok

    def read(self, device: torch.device) -> tuple[list[dict[str, float]], list[bool]]:
        """At a log step: per micro-batch {key: value} on this rank and whether it was finite on every rank.

        One all_reduce(MIN) of the flags (so every rank agrees) and one read."""
        if not self.micro:
            return [], []
        flags = torch.stack([m.ok for m in self.micro]).to(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        flat = torch.cat([m.values for m in self.micro]).tolist()  # micro-batches may differ in keys
        ok = [bool(f) for f in flags.tolist()]
        out, at = [], 0
        for m in self.micro:
            out.append(dict(zip(m.keys, flat[at:at + len(m.keys)])))
            at += len(m.keys)
        return out, ok

    def clear(self) -> None:
        self.micro = []


class NonFiniteGuard:
    """Counts non-finite micro-batches and optimizer steps ZeRO skipped for non-finite gradients."""

    def __init__(self, patience: int, engine: Any, last_checkpoint: Any, deferred: bool = False) -> None:
        self.patience, self.engine, self.deferred = patience, engine, deferred
        self.last_checkpoint = last_checkpoint  # callable -> tag, for the stop message
        self.run, self.total, self._skipped = 0, 0, engine.skipped_steps
        self._steps: list[tuple[int, bool]] = []  # deferred: (step, skipped by the optimizer) since review

    # -------------------------------------------------------------------------------- deferred mode
    def backward_loss(self, out: dict[str, torch.Tensor], ok: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: `loss` x 1 when `ok` (exact), x NaN when not, so the optimizer sees
        non-finite gradients and skips the step (no read)."""
        loss = out["loss"]
        one = torch.ones((), dtype=loss.dtype, device=loss.device)
        return loss * torch.where(ok.bool(), one, torch.full_like(one, float("nan")))

    def step_done(self, step: int) -> bool:
        """After `engine.step` at a boundary: was the step skipped? (A host counter DeepSpeed keeps.)"""
        skipped = self.engine.skipped_steps > self._skipped
        self._skipped = self.engine.skipped_steps
        self._steps.append((step, skipped))
        return skipped

    def _fp16_scaling(self) -> bool:
        return bool(self.engine.fp16_enabled() and self.engine.dynamic_loss_scale())

    def review(self, window: list[tuple[int, dict[str, float], bool]]) -> int:
        """At a log step, in step order: count each non-finite micro-batch (`window`: step, values, finite
        on every rank) and each skipped step with finite losses (non-finite gradients), reset the run at a
        clean step, warn and stop as the synchronous mode does. Every rank sees the same flags and counters
        and so raises at the same step. Returns the non-finite micro-batches of this window."""
        bad_micro = 0
        by_step: dict[int, list[tuple[dict[str, float], bool]]] = {}
        for step, values, ok in window:
            by_step.setdefault(step, []).append((values, ok))
        for step, skipped in self._steps:
            bad_here = False
            for values, ok in by_step.get(step, []):
                if ok:
                    continue
                bad_here, bad_micro = True, bad_micro + 1
                names = [k for k in LOSS_KEYS if k != "loss" and k in values and not _finite(values[k])]
                if not names and "loss" in values and not _finite(values["loss"]):
                    names = ["loss"]
                self._count(step, ", ".join(names) or "loss on another rank", "micro-batches",
                            "micro-batch and its optimizer step skipped")
            if skipped and not bad_here:
                if self._fp16_scaling():
                    log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", step)
                else:
                    self._count(step, "gradients", "steps", "optimizer step skipped")
            elif not skipped:
                self.run = 0
        self._steps = []
        return bad_micro

    def _count(self, step: int, what: str, unit: str, action: str) -> None:
        self.run, self.total = self.run + 1, self.total + 1
        log.warning("step %d: non-finite %s; %s (%d in a row)", step, what, action, self.run)
        if self.run >= self.patience:
            raise NonFiniteError(
                f"stopping at step {step}: non-finite {what} in {self.run} {unit} in a row "
                f"(train.nonfinite_patience={self.patience}); "
                f"last checkpoint: {self.last_checkpoint() or 'none'}")

    # ----------------------------------------------------------------------------- synchronous mode
    def forward_ok(self, out: dict[str, torch.Tensor], step: int) -> bool:
        """False (on every rank) when any rank's loss is non-finite: skip backward and step. Reads."""
        bad = nonfinite_objectives(out)
        if not any_rank(bool(bad), self.engine.device):
            return True
        self._count(step, ", ".join(bad) or "loss on another rank", "micro-batches", "micro-batch skipped")
        return False

    def after_step(self, step: int) -> bool:
        """Count a step ZeRO skipped for inf/NaN gradients (a clean step resets the run); True when the
        optimizer skipped this step.

        Not under fp16 dynamic loss scaling: there a skipped step is the scaler halving a scale that
        overflowed fp16 (several in a row at start-up, from 2^train.fp16_initial_scale_power down to what
        the gradients fit), and DeepSpeed itself stops the run once the scale is at its minimum and still
        overflows."""
        if self.engine.skipped_steps <= self._skipped:
            self.run = 0
            return False
        self._skipped = self.engine.skipped_steps
        if self._fp16_scaling():
            log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", step)
        else:
            self._count(step, "gradients", "steps", "optimizer step skipped")
        return True

def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
