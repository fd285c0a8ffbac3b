"""Process helpers: freezing a peer (a store host stopped like Slurm's `scontrol suspend`), and a child
process in which `import torch` fails (the ONNX serving tests)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def wait_stopped(pid: int, within_s: float = 30.0) -> None:
    """Until every thread of `pid` is stopped. kill(SIGSTOP) returns once the signal is queued; the process
    stops when one of its threads takes it, so on a busy machine its store thread may still answer a
    request sent right after (CI saw exactly that)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {within_s} s")


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process (a serving process without torch)")
sys.meta_path.insert(0, _NoTorch())
"""
"""Prepend to a `python -c` script: every later `import torch` raises (a serving process without torch)."""
