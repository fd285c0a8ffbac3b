"""No device-to-host read in a healthy non-logging step (issue #17): 2 ranks under the deepspeed launcher,
ZeRO-3, every read our code makes counted per step by tests/sync_probe.py (see its docstring for what is
counted and what is DeepSpeed's own). Reads are allowed at log steps (metrics, the stop check, the
non-finite flags) and in the first step (the measured-memory record), nowhere else. Marked slow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import ROOT, TINY

from launch.rendezvous import free_port

pytestmark = pytest.mark.slow
EVERY, STEPS = 4, 9


def _probe(shards, tmp_path: Path, *extra: str) -> dict[int, dict[int, list]]:
    import os
    import subprocess

    out = tmp_path / "reads"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
           str(free_port()), "--no_local_rank", str(ROOT / "tests" / "sync_probe.py"),
           "train", f"data.train={shards['train']}", f"run.dir={tmp_path / 'run'}", *TINY,
           f"train.steps={STEPS}", f"logging.every={EVERY}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MMPT_SYNC_PROBE_OUT": str(out),
                            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {rank: {int(k): v for k, v in json.loads(Path(f"{out}.rank{rank}.json").read_text()).items()}
            for rank in (0, 1)}


def test_non_logging_steps_read_nothing_from_the_device(shards, tmp_path):
    """Log steps 4 and 8 (and the last, 9) read; train.stop_check_every=3 adds the stop agreement at 3 and 6
    (the consensus module's one read, nothing else); steps 2, 5 and 7 read nothing on either rank."""
    reads = _probe(shards, tmp_path, "train.stop_check_every=3")
    for rank, by_step in reads.items():
        # the probe works: log steps do read (the metrics), so a silent probe cannot pass this test
        assert by_step.get(EVERY), f"rank {rank}: no read counted at log step {EVERY}: probe broken"
        offending = {s: by_step[s] for s in (2, 5, 7) if by_step.get(s)}
        assert not offending, f"rank {rank}: device reads in non-logging steps: {offending}"
        for s in (3, 6):  # stop-check steps: only the agreement itself
            where = {w.split(":")[0] for w, _ in by_step.get(s, [])}
            assert where == {"parallel.consensus"}, f"rank {rank} step {s}: {by_step.get(s)}"
