"""`pretrain bench loss` and `pretrain bench step`, hooked into the CLI through `pretrain.cli.REGISTRARS`.

Registration only: the benchmarks live in `pretrain/bench_loss.py` (contrastive-loss peak memory) and
`pretrain/bench_step.py` (training-step throughput, FLOPs, MFU).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `bench loss` and `bench step`."""
    from pretrain.bench_loss import add_loss_parser
    from pretrain.bench_step import add_step_parser

    add_loss_parser(bench)
    add_step_parser(bench)
