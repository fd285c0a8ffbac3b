"""A quiet log: our own lines, third-party lines that tell the user something, and nothing else.

A CPU run of `make demo` used to print, on every rank, DeepSpeed's "Setting accelerator to CPU" warning,
torch's "No CUDA runtime is found", megatron-core's "Transformer Engine and Apex are not installed" (four
times) and INFO lines, and a "built successfully" print: nothing a user can act on, burying the lines
that matter. Each entry below names the exact logger or warning and the message it drops, and why;
everything else still prints. Several of these are emitted while deepspeed, torch.utils.cpp_extension or
megatron are being imported, so `install_filters()` runs first thing in `pretrain.cli.main`, before
any of those imports.

Every rank runs the same code, so INFO lines of ranks > 0 repeat rank 0's: `quiet_other_ranks` keeps
only their warnings and errors (DeepSpeed's logger included) unless `logging.all_ranks=true`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

OUR_LOGGERS = ("mmpt", "data_pipelines")
"""Loggers of this project: INFO by default. Everything else (the root logger) logs warnings and up."""


@dataclass(frozen=True)
class Noise:
    """One third-party message dropped: `where` is a logger name (records) or a module regex (warnings)."""

    where: str
    message: str
    why: str


LOG_NOISE = (
    Noise("DeepSpeed", r"Setting accelerator to CPU\.",
          "no GPU is a fact, not a fault: launch/rendezvous.py says 'no GPU: training on CPU' once instead"),
    Noise("torch.utils.cpp_extension", r"No CUDA runtime is found",
          "DeepSpeed builds its CPU shared-memory allreduce with torch's extension loader, which looks for "
          "a CUDA toolkit the CPU op does not need"),
)
"""Log records (logger, message regex matched at the start) dropped on every rank."""

WARNING_NOISE = (
    Noise(r"megatron\.", r"Transformer Engine and Apex are not installed",
          "megatron-core falls back for its own optimizer and FSDP, which mmpt does not use (it uses "
          "megatron's parallel state and layers; optimizers come from parallel/optimizers.py)"),
    Noise("", r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
          "DeepSpeed's ZeRO-3 calls these torch.distributed spellings once per step; not ours to fix"),
)
"""Python warnings (module regex, message regex) ignored on every rank."""

PRINTED_NOISE = re.compile(r"DeepSpeed \S+ built successfully")
"""A bare print() of DeepSpeed's communication set-up (`deepspeed.comm.torch.build_shm_op`), per rank."""


class DropNoise(logging.Filter):
    """Logger-level filter dropping the records of `LOG_NOISE` that belong to its logger."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.match(msg) for p in self.patterns)


class OnlyWarnings(logging.Filter):
    """Drops records below WARNING: the rank > 0 rule of `quiet_other_ranks`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def install_filters() -> None:
    """Drop the messages of `LOG_NOISE` and `WARNING_NOISE` in this process; idempotent.

    Logger filters sit on the named logger object, which the library later fetches by the same name
    (DeepSpeed's logger factory and torch's logging set-up add handlers and levels, keeping filters), so
    this works before the library is imported, which is when it has to run."""
    by_logger: dict[str, list[str]] = {}
    for n in LOG_NOISE:
        by_logger.setdefault(n.where, []).append(n.message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise(patterns))
    for n in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=n.message, module=n.where)


def setup_logging(verbose: bool = False) -> None:
    """The CLI's logging: our loggers at INFO (DEBUG with -v), third-party loggers at WARNING (all at
    DEBUG with -v: the user asked for everything), and the noise filters. Their INFO lines (megatron's
    "Detected Megatron Core", ...) describe the libraries' internals, not the run."""
    install_filters()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def quiet_other_ranks(rank: int, all_ranks: bool) -> bool:
    """On rank > 0 (unless `all_ranks`), keep only warnings and errors: on the root logger's handlers,
    which every propagating logger (ours, megatron's, torch's) reaches, and on DeepSpeed's own logger,
    which does not propagate. Returns whether the rule was applied."""
    if rank == 0 or all_ranks:
        return False
    targets: list[logging.Filterer] = [*logging.getLogger().handlers, logging.getLogger("DeepSpeed")]
    for target in targets:
        if not any(isinstance(f, OnlyWarnings) for f in target.filters):
            target.addFilter(OnlyWarnings())
    return True


@contextlib.contextmanager
def drop_printed(pattern: re.Pattern[str] = PRINTED_NOISE) -> Iterator[None]:
    """Hold what the block prints to sys.stdout and pass on every line but those matching `pattern`
    (library code that print()s instead of logging); passed on even when the block raises."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        kept = [line for line in held.getvalue().splitlines(keepends=True) if not pattern.fullmatch(
            line.rstrip("\n"))]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()


def quiet_launcher_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for the deepspeed launcher's own processes, which run no code of ours to filter:
    when DeepSpeed finds no accelerator here, tell it `DS_ACCELERATOR=cpu` so the launcher, its per-node
    agent and every rank skip the detection and its "Setting accelerator to CPU" warning."""
    if "DS_ACCELERATOR" in env:
        return env
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return env
    install_filters()
    if get_accelerator().device_name() == "cpu":
        return {**env, "DS_ACCELERATOR": "cpu"}
    return env
