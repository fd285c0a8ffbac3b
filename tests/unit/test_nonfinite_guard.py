"""NonFiniteGuard.after_step: fp16 loss-scale overflows are not non-finite gradients (no DeepSpeed)."""

from __future__ import annotations

import pytest

from pretrain.nonfinite import NonFiniteError, NonFiniteGuard


class FakeEngine:
    """What the guard reads of a DeepSpeed engine: its skipped-step counter and its precision settings."""

    def __init__(self, fp16: bool, dynamic: bool = True):
        self.skipped_steps, self._fp16, self._dynamic = 0, fp16, dynamic

    def fp16_enabled(self) -> bool:
        return self._fp16

    def dynamic_loss_scale(self) -> bool:
        return self._dynamic


def _skip_steps(guard: NonFiniteGuard, engine: FakeEngine, n: int) -> None:
    for step in range(1, n + 1):
        engine.skipped_steps += 1  # ZeRO found inf/NaN gradients and did not step
        guard.after_step(step)


def test_fp16_loss_scale_search_does_not_stop_the_run():
    """DeepSpeed starts fp16 at scale 2^16 and skips a step per overflow while it halves the scale: five in
    a row for the tests' MICRO model (2^16 -> 2^12). That is the scaler working, not a diverged run."""
    engine = FakeEngine(fp16=True)
    guard = NonFiniteGuard(3, engine, lambda: None)
    _skip_steps(guard, engine, 5)
    assert guard.run == 0 and guard.total == 0
    guard.after_step(6)  # a clean step after the search
    assert guard.run == 0


@pytest.mark.parametrize("fp16,dynamic", [(False, True), (True, False)])
def test_skipped_steps_stop_the_run_without_dynamic_loss_scaling(fp16, dynamic):
    """bf16/fp32, or fp16 with a static scale: a skipped step means non-finite gradients; patience holds."""
    engine = FakeEngine(fp16, dynamic)
    guard = NonFiniteGuard(3, engine, lambda: None)
    with pytest.raises(NonFiniteError, match="stopping at step 3: non-finite gradients in 3 steps in a row"):
        _skip_steps(guard, engine, 5)


def test_window_keeps_each_micro_batch_own_losses():
    """FLIP's unmasked tail starts inside a log window: loss_mim is in the first micro-batch and not the
    second. Each keeps its own losses (no KeyError, no value put under another loss's name)."""
    import torch

    from pretrain.nonfinite import Window

    w = Window()
    t = torch.tensor
    w.add({"loss": t(3.0), "loss_contrastive": t(1.0), "loss_mim": t(2.0)}, 1)
    w.add({"loss": t(1.5), "loss_contrastive": t(1.5)}, 2)
    w.add({"loss": t(float("nan")), "loss_contrastive": t(0.5)}, 3)
    micro, ok = w.read(torch.device("cpu"))
    assert w.keys == ["loss", "loss_contrastive", "loss_mim"]
    assert micro == [{"loss": 3.0, "loss_contrastive": 1.0, "loss_mim": 2.0},
                     {"loss": 1.5, "loss_contrastive": 1.5},
                     {"loss": micro[2]["loss"], "loss_contrastive": 0.5}]
    assert ok == [True, True, False]
