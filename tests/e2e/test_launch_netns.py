"""torchrun across two "hosts": two network namespaces joined by a veth pair, one torchrun per namespace
(`pretrain launch --launcher torchrun --node-rank R`), rendezvous at the first namespace's address."""

from __future__ import annotations

import os
import subprocess

import pytest
from localcluster import missing
from tiny import PYTHON, ROOT, logged_steps, train_args
from tiny import write_micro_shards as write_shards

from launch.netns import netns_pair
from launch.rendezvous import free_port

pytestmark = pytest.mark.slow


def test_torchrun_across_two_network_namespaces(tmp_path):
    reason = missing(["ip"])
    if reason:
        pytest.skip(reason)
    shards = write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    port = free_port()  # free on the host; each namespace has its own, empty, port space
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    train = ["train", *train_args(shards, run, 3, "parallel.timeout_s=60", "logging.all_ranks=true")]
    with netns_pair() as (host_a, host_b):
        addr_a = host_a.addr
        procs = []
        for node_rank, ns in enumerate((host_a.ns, host_b.ns)):
            # GLOO_SOCKET_IFNAME: gloo would otherwise bind the hostname's loopback address
            cmd = ["ip", "netns", "exec", ns, "env", "GLOO_SOCKET_IFNAME=tnet0", "OMP_NUM_THREADS=1",
                   PYTHON, "-m", "pretrain.cli", "launch", "--launcher", "torchrun", "--nodes", "2",
                   "--procs-per-node", "1", "--node-rank", str(node_rank), "--master-addr", addr_a,
                   "--master-port", str(port), "--", *train]
            log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append((proc, log))
        codes = []
        for p, log in procs:
            try:
                codes.append(p.wait(timeout=300))
            finally:
                if p.poll() is None:
                    p.kill()
                log.close()
    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs)
    assert f"rank 1 of 2 (from torch variables), master {addr_a}:{port}" in logs[1]
    assert logged_steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"
