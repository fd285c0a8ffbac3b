"""Fixtures shared by tests/unit (fast, single process) and tests/e2e (multi-process, launchers, Slurm/MPI).

This folder is on sys.path (pytest puts a rootless conftest's folder there), so test modules import the
helper modules beside it: `tiny` (tiny models, shards, running `pretrain` as users do), `datautil`
(data-pipeline helpers) and `localcluster` (Slurm/MPI/namespaces on one machine).
"""

from __future__ import annotations

import pytest
import torch
from datautil import tiny_tokenizer
from tiny import write_shards

from data_pipelines.tokenizer import TextTokenizer


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core box spinning OpenMP workers
    made small training loops 10-30x slower. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_tok() -> TextTokenizer:
    """A 200-token BPE tokenizer trained on synthetic captions (one per test module)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """`tiny.write_shards`: 640 training and 128 held-out 32-px samples, written once per module."""
    return write_shards(tmp_path_factory.mktemp("shards"))
