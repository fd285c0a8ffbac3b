"""Checks of how a run is scheduled over `train.steps`: settings each valid alone whose combination makes a
feature silently do nothing (a best checkpoint never recorded, a stop request never honoured), and warnings
for combinations that run but not as a reader of the keys would expect.

They describe a run about to start, so `validate` applies them to configs given on the command line, not to
the copy stored in a checkpoint (a checkpoint saved before a check existed still loads for eval, export or
resume; the resumed run's own config is checked).
"""

from __future__ import annotations

import logging
import math

from pretrain.config.schema import Config

log = logging.getLogger("mmpt.config")
_warned: set[str] = set()  # each warning once per process (validate runs more than once per command)


def schedule_problems(cfg: Config) -> list[str]:
    """Refusals, each naming its keys with their values and what to change."""
    t, e, c, out = cfg.train, cfg.eval, cfg.checkpoint, []
    if t.stop_check_every > t.steps >= 1:
        out.append(f"train.stop_check_every ({t.stop_check_every}) must be <= train.steps ({t.steps}): no "
                   "step of the run is a multiple of it, so a stop request (SIGUSR1/SIGTERM) would never be "
                   "honoured before the scheduler kills the job; use 0 (check at log steps) or a smaller "
                   "value")
    if c.keep_best and not _best_reachable(cfg):
        where = ("only at train.steps" if c.every == 0 else
                 f"at multiples of {c.every} and at train.steps")
        out.append(f"checkpoint.keep_best={c.keep_best} can never record a best: no checkpoint gets a "
                   f"validation (checkpoint.every={c.every} saves {where}={t.steps}; validation runs every "
                   f"eval.every={e.every} steps and eval.at_end=false). Set eval.at_end=true, or make "
                   "train.steps a multiple of eval.every, or set checkpoint.every to a multiple of "
                   "eval.every that is <= train.steps")
    return out


def _best_reachable(cfg: Config) -> bool:
    """Whether some checkpoint step is also a validation step, the only way `best.json` gets written.

    Checkpoints: multiples of checkpoint.every (if > 0) and the last step. Validations: multiples of
    eval.every and, with eval.at_end, the last step (validated before the final save, pretrain/train.py).
    Without eval.every nor eval.at_end (or with a key out of range) another message already says so."""
    e, c, steps = cfg.eval, cfg.checkpoint, cfg.train.steps
    if e.at_end or e.every <= 0 or steps < 1 or c.every < 0:
        return True
    if steps % e.every == 0:  # the final checkpoint is a validation step
        return True
    return c.every > 0 and math.lcm(c.every, e.every) <= steps


def schedule_warnings(cfg: Config) -> list[tuple[int, str]]:
    """Settings that run, but not as their names suggest: (logging level, message).

    A warm-up longer than the run is an INFO note, not a refusal nor a warning: every shortened smoke run
    (`pretrain demo train.steps=3`, with the recipe's 30 warm-up steps; the test recipes) has it, and the
    demo's output is held to an allowlist without warnings (tests/e2e/test_quiet_log.py)."""
    t, op, out = cfg.train, cfg.optim, []
    if op.warmup_steps > t.steps >= 1:
        peak = t.steps / op.warmup_steps
        out.append((logging.INFO, f"optim.warmup_steps ({op.warmup_steps}) > train.steps ({t.steps}): the "
                    f"learning rate never reaches optim.lr (it peaks at {peak:.2g} x optim.lr on the last "
                    "step) and never decays; lower optim.warmup_steps for a full schedule"))
    if t.grad_accum > 1 and cfg.objectives.contrastive.weight > 0 and t.task == "pretrain":
        out.append((logging.WARNING, f"train.grad_accum={t.grad_accum} with objectives.contrastive.weight > "
                    "0: each micro-batch is its own contrastive loss over train.micro_batch x data-parallel "
                    "ranks samples; accumulation adds samples per optimizer step, not contrastive negatives"))
    return out


def warn_once(messages: list[tuple[int, str]]) -> None:
    """Log each message once per process, on rank 0 only where the launcher's variables say which rank this
    is (every rank validates the same config; ranks > 0 would repeat rank 0's lines)."""
    from launch.env import LaunchEnvError, discover

    try:
        rank = discover().rank
    except LaunchEnvError:
        rank = 0
    for level, msg in messages:
        if msg not in _warned:
            _warned.add(msg)
            if rank == 0:
                log.log(level, "config: %s", msg)
