"""Non-finite guard: a NaN/inf loss skips the micro-batch on every rank (like an fp16 overflow); too many
in a row stop the run naming the step and the objective, rather than training on garbage or hanging."""

from __future__ import annotations

import logging
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
    """Names of the objectives whose loss is NaN or inf in this micro-batch."""
    bad = [k for k in LOSS_KEYS if k != "loss" and k in out and not torch.isfinite(out[k]).all()]
    if not bad and not torch.isfinite(out["loss"]).all():
        bad = ["loss"]
    return bad


class NonFiniteGuard:
    """Counts non-finite micro-batches (forward) and skipped optimizer steps (ZeRO's overflow check)."""

    def __init__(self, patience: int, engine: Any, last_checkpoint: Any) -> None:
        self.patience, self.engine = patience, engine
        self.last_checkpoint = last_checkpoint  # callable -> tag, for the stop message
        self.run, self.total, self._skipped = 0, 0, engine.skipped_steps

    def forward_ok(self, out: dict[str, torch.Tensor], step: int) -> bool:
        """False (on every rank) when any rank's loss is non-finite: skip backward and step."""
        bad = nonfinite_objectives(out)
        if not any_rank(bool(bad), self.engine.device):
            return True
        self.run, self.total = self.run + 1, self.total + 1
        what = ", ".join(bad) or "loss on another rank"
        log.warning("step %d: non-finite %s; micro-batch skipped (%d in a row)", step, what, self.run)
        if self.run >= self.patience:
            raise NonFiniteError(
                f"stopping at step {step}: non-finite {what} in {self.run} micro-batches in a row "
                f"(train.nonfinite_patience={self.patience}); "
                f"last checkpoint: {self.last_checkpoint() or 'none'}")
        return False

    def after_step(self, step: int) -> None:
        """Count a step ZeRO skipped for inf/NaN gradients; a clean step resets the run.

        Not under fp16 dynamic loss scaling: there a skipped step is the scaler halving a scale that
        overflowed fp16 (several in a row at start-up, from 2^train.fp16_initial_scale_power down to what
        the gradients fit), and DeepSpeed itself stops the run once the scale is at its minimum and still
        overflows."""
        if self.engine.skipped_steps > self._skipped:
            self._skipped = self.engine.skipped_steps
            if self.engine.fp16_enabled() and self.engine.dynamic_loss_scale():
                log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", step)
                return
            self.run, self.total = self.run + 1, self.total + 1
            log.warning("step %d: non-finite gradients, optimizer step skipped", step)
            if self.run >= self.patience:
                raise NonFiniteError(f"stopping at step {step}: non-finite gradients in {self.run} steps "
                                     "in a row")
        else:
            self.run = 0
