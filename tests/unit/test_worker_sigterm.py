"""A DataLoader worker and SIGTERM (data_pipelines/loader.py `_worker_init`): from its rank (the worker's
parent) it exits at once; from anyone else (Slurm's scancel signals every process) it keeps serving so its
rank can finish the step and save, and ends at the latest WORKER_SIGTERM_GRACE_S later (docs/launch.md),
so it cannot outlive its job. Real processes: this test -> a "rank" -> a forked worker (cap set to 1 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = """
import json, os, signal, sys, time
import data_pipelines.loader as L  # imports torch, which may start threads: a rank, as in training

L.WORKER_SIGTERM_GRACE_S = 1
r, w = os.pipe()
pid = os.fork()  # as the DataLoader starts a worker: the child has one thread when its init runs
if pid == 0:
    os.close(r)
    L._worker_init(0)
    os.write(w, b"x")
    time.sleep(60)
    os._exit(3)
os.close(w)
os.read(r, 1)
print(pid, flush=True)
if sys.argv[1] == "rank":
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
else:
    sys.stdin.readline()  # the outsider has signalled
    t0 = time.monotonic()
_, status = os.waitpid(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "after_s": time.monotonic() - t0}), flush=True)
"""


def _run(sender: str) -> dict:
    rank = subprocess.Popen([sys.executable, "-c", RANK, sender], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    worker = int(rank.stdout.readline())
    if sender == "outsider":
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(worker, 0)  # still there: it goes on serving its rank
        rank.stdin.write("go\n")
        rank.stdin.flush()
    out, _ = rank.communicate(timeout=60)
    assert rank.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_sigterm_from_its_rank_ends_the_worker_at_once():
    res = _run("rank")
    assert res["rc"] == 0 and res["after_s"] < 5, res


def test_sigterm_from_outside_is_capped_by_the_grace_period():
    res = _run("outsider")
    assert res["rc"] == -signal.SIGALRM, res  # the cap ended it: not SIGTERM, not its 60 s
    assert res["after_s"] < 10, res
