"""`pretrain launch` arguments parsed and planned as the CLI does, without running anything (unit tests)."""

from __future__ import annotations

import argparse

from launch import cli as launch_cli
from launch.commands import LaunchPlan


def parse(argv: list[str]) -> argparse.Namespace:
    """`pretrain launch ARGV` parsed by the real subcommand parser."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    launch_cli.register(sub=sub, bench=None, data=None)  # type: ignore[arg-type]
    return parser.parse_args(["launch", *argv])


def plan(argv: list[str], env: dict[str, str] | None = None) -> LaunchPlan:
    """The launch plan `pretrain launch ARGV` makes under environment `env` (empty: no Slurm, no MPI)."""
    return launch_cli.plan_from_args(parse(argv), env or {})
