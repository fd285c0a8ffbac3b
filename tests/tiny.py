"""Shared bits for tests that run real training: tiny models, synthetic shards, and running `pretrain`
the way users do (one process or the real deepspeed launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from parallel.settings import ParallelConfig
from pretrain.checkpoint.atomic import MARKER
from pretrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A model small enough that a DeepSpeed step takes milliseconds on one CPU core.
TINY = [
    "model.image_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.layers=2",
    "model.vision.heads=2", "model.text.width=64", "model.text.layers=2", "model.text.heads=2",
    "model.text.context_length=24", "model.embed_dim=32", "model.decoder.width=32", "model.decoder.layers=1",
    "model.decoder.heads=2", "data.vocab_size=256", "data.workers=2", "data.shuffle_buffer=50",
    "train.micro_batch=8", "train.precision=fp32", "optim.warmup_steps=2", "optim.lr=2e-3",
    "logging.every=1", "logging.progress=false", "parallel.zero_stage=3", "parallel.persistence_threshold=0",
]
# TINY and the other test recipes partition every parameter (threshold 0); the correctness tests also run at
# the shipped default, under which ZeRO-3 keeps the small parameters of these models whole on every rank.
DEFAULT_PERSISTENCE = f"parallel.persistence_threshold={ParallelConfig.persistence_threshold}"


# The plain 4-rank ZeRO-3 run (TINY: every parameter partitioned; 3 steps, each logged) under DeepSpeed's
# comms logger: tests/e2e/test_zeropp.py compares the ZeRO++ switches against its losses and
# tests/e2e/test_plan_comm.py checks `pretrain plan --comm` against its logged traffic. Trained once per
# session (`plain_zero3_4ranks`); the logger counts collectives, it does not change them.
PLAIN_ZERO3 = [*TINY, "train.steps=3", "logging.tensorboard=false"]
COMMS_LOG = {"MMPT_COMMS_LOG": "{dir}/comms"}  # parallel/comms_probe.py writes {dir}/comms.rank{R}.json


def plain_zero3_4ranks(trained_once, shards: dict[str, str]) -> Path:
    """The shared PLAIN_ZERO3 run on 4 ranks (conftest's `trained_once`); its comms files are beside it."""
    return trained_once([f"data.train={shards['train']}", *PLAIN_ZERO3], procs=4, env=COMMS_LOG)


# The reference 2-rank ZeRO-3 run (TINY, 16 steps, checkpoints at steps 8 and 16, deepspeed launcher),
# trained once per session (`straight_2ranks`): tests/e2e/test_train_e2e.py checks it (and compares its
# losses with the default-threshold run's), test_reliability.py resumes a killed run of the same arguments
# against it (the suite's threshold-0 resume check) and compares that run's first steps with it exactly,
# test_no_unpickling.py plants payloads in copies of its checkpoints.
STRAIGHT_STEPS, STRAIGHT_EVERY = 16, 8
STRAIGHT = [f"train.steps={STRAIGHT_STEPS}", f"checkpoint.every={STRAIGHT_EVERY}"]  # with TINY


def straight_2ranks(trained_once, shards: dict[str, str]) -> Path:
    """The shared STRAIGHT run on 2 ranks (conftest's `trained_once`)."""
    return trained_once([*TINY, f"data.train={shards['train']}", *STRAIGHT], procs=2)


def persistent_params(run_dir: Path) -> int:
    """Elements per TP rank that ZeRO-3 kept whole in `run_dir`'s run (the plan in its memory.json)."""
    import json

    return json.loads((Path(run_dir) / "memory.json").read_text())["plan"]["params"]["persistent_per_tp_rank"]


def write_shards(d: Path) -> dict[str, str]:
    """640 training samples in 8 shards and 128 held-out samples in 2, 32-px images."""
    from data_pipelines.synth import write_synthetic_shards

    write_synthetic_shards(d / "train", samples=640, samples_per_shard=80, image_size=32, seed=0)
    write_synthetic_shards(d / "val", samples=128, samples_per_shard=64, image_size=32, seed=1)
    return {"train": f"{d}/train/shard-{{000000..000007}}.tar",
            "val": f"{d}/val/shard-{{000000..000001}}.tar",
            "classnames": str(d / "val" / "classnames.txt")}


def run_pretrain(args: list[str], env: dict[str, str] | None = None, timeout: float = 300,
                 procs: int = 1) -> subprocess.CompletedProcess:
    """`pretrain ARGS` as a user runs it: one process, or `procs` ranks under the real deepspeed launcher."""
    from launch.rendezvous import free_port

    if procs > 1:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(procs),
               "--master_port", str(free_port()), "--no_local_rank", "--module", "pretrain.cli", *args]
    else:
        cmd = [sys.executable, "-m", "pretrain.cli", *args]
    # own session: a timed-out run is killed with all its ranks (subprocess.run would kill only the
    # launcher and leave the ranks running, slowing every later test)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# An even smaller model for launcher tests: they measure launch paths, not learning.
MICRO = [
    "model.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.layers=1",
    "model.vision.heads=2", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.context_length=16", "model.embed_dim=16", "model.decoder.width=16", "model.decoder.layers=1",
    "model.decoder.heads=2", "data.vocab_size=128", "data.tokenizer_samples=200", "data.workers=1",
    "data.shuffle_buffer=20", "train.micro_batch=4", "train.precision=fp32", "optim.warmup_steps=1",
    "logging.every=1", "logging.progress=false", "logging.tensorboard=false", "parallel.zero_stage=3",
]


def write_micro_shards(directory: Path) -> str:
    """320 synthetic image-caption samples in 4 shards; returns the brace URL for data.train."""
    from data_pipelines.synth import write_synthetic_shards

    write_synthetic_shards(directory, samples=320, samples_per_shard=80, image_size=32, seed=0)
    return f"{directory}/shard-{{000000..000003}}.tar"


def train_args(shards: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*MICRO, f"data.train={shards}", f"run.dir={run_dir}", f"train.steps={steps}", *extra]


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir)]


def pretrain_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m pretrain.cli ARGS` in the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def cli_json(*args: str) -> dict:
    """`pretrain ARGS` in this process (`pretrain.cli.main`, the CLI's own parsing and output): asserts exit 0
    and returns its last stdout line as JSON. For commands whose program start is tested elsewhere: it saves
    an interpreter's imports (~2 CPU s). Errors go to stderr, which pytest shows."""
    import contextlib
    import io
    import json

    from pretrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    assert rc == 0, (args, out.getvalue()[-3000:])
    return json.loads(out.getvalue().strip().splitlines()[-1])


# Random-init weights exports for the inference tests (ONNX export, embed backends): no training needed.
TINY_INFER = ["model.image_size=32", "model.vision.patch_size=8", "model.vision.width=32",
              "model.vision.layers=2", "model.vision.heads=2", "model.text.width=32", "model.text.layers=2",
              "model.text.heads=2", "model.text.context_length=16", "model.embed_dim=16",
              "model.decoder.width=16", "model.decoder.layers=1", "model.decoder.heads=2"]


def write_tiny_weights(folder: Path, tok, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """A weights export of a random-init TINY_INFER model (what `pretrain convert` reads), `overrides`
    applied after TINY_INFER."""
    import torch

    from pretrain.checkpoint.sources import DictSource
    from pretrain.checkpoint.universal import write_weights
    from pretrain.config import embedded_config_path, load_config, to_dict
    from pretrain.models.pretrain_model import PretrainModel

    cfg = load_config(embedded_config_path(), [*TINY_INFER, *overrides])
    torch.manual_seed(seed)
    model = PretrainModel.from_config(cfg, tok)
    meta = {"config": to_dict(cfg), "tokenizer": tok.to_json(), "step": 0}
    write_weights(DictSource(model.state_dict(), meta, "random init"), folder, overwrite=True)
    return folder


def fake_run(path: Path, steps: list[int]) -> str:
    """A run folder whose checkpoints are empty but marked complete (`global_step{S}` + MARKER, `latest`):
    enough for code that lists and picks checkpoints, with the model loader replaced by the test."""
    root = path / "checkpoints"
    for s in steps:
        (root / f"global_step{s}").mkdir(parents=True)
        (root / f"global_step{s}" / MARKER).write_text("{}")
    (root / "latest").write_text(f"global_step{steps[-1]}")
    return str(path)
