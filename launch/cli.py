"""`pretrain launch`: start training under deepspeed, torchrun, mpirun or srun with one command.

    pretrain launch --launcher torchrun --nodes 2 --procs-per-node 8 [--dry-run] -- train --config c.yaml
    pretrain launch --launcher deepspeed --site eu --rendezvous 10.0.0.5:29400 -- train --config c.yaml
    pretrain launch --serve-rendezvous 10.0.0.5:29400     # a cross-site store that outlives every site

Defaults come from the environment, so inside a Slurm allocation `--nodes`, the master address (the
first node's NodeAddr), the port (from the job id), the node rank (SLURM_NODEID) and a deepspeed hostfile
(from SLURM_JOB_NODELIST) need no flags. torchrun, mpirun and srun replace this process (exec), so their
exit status is the job's and signals reach them directly. The deepspeed launcher runs as a child instead
(launch/supervise.py): its runner has no SIGTERM handler, so this process passes SIGTERM, SIGINT and
SIGUSR1 on to the ranks, waits, and exits with the launcher's status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping

from launch.commands import LAUNCHERS, LaunchPlan, LaunchPlanError, build_command, render
from launch.env import DEFAULT_PORT, env_int, in_slurm_step, slurm_port
from launch.hostfile import node_address, read_hostfile, slurm_hosts, write_hostfile, written_hostfiles
from launch.ports import is_tcp_port
from launch.rendezvous import free_port


def _mpi_flavor(env: Mapping[str, str]) -> str:
    """openmpi or mpich, from MMPT_MPI_FLAVOR or `mpirun --version` (Open MPI names itself there)."""
    if env.get("MMPT_MPI_FLAVOR"):
        return env["MMPT_MPI_FLAVOR"]
    if shutil.which("mpirun") is None:
        return "openmpi"
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return "openmpi"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "mpich"


def _cuda_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


def _default_procs() -> int:
    return max(1, _cuda_gpus())


def _visible_devices(e: Mapping[str, str], launcher: str, nodes: int, hostfile: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a one-node deepspeed launch on CUDA (launch.commands.deepspeed_command
    turns it into --include); None elsewhere: on CPU the launcher's --num_accelerators is the rank count."""
    value = e.get("CUDA_VISIBLE_DEVICES")
    if launcher != "deepspeed" or nodes != 1 or hostfile or value is None:
        return None
    if e.get("DS_ACCELERATOR", "cuda") not in ("", "cuda") or _cuda_gpus() == 0:
        return None
    return value


def _check_nodes_gpus(e: Mapping[str, str], launcher: str, nodes: int, hostfile: str | None,
                      ppn: int) -> None:
    """deepspeed on several nodes (or from a hostfile) starts each node's ranks on its GPUs 0..P-1 (its
    per-node launcher sets CUDA_VISIBLE_DEVICES from the hostfile's slots, whatever the variable said), so a
    CUDA_VISIBLE_DEVICES that lists other GPUs (a shared node without Slurm's ConstrainDevices, `4,5,6,7`)
    would put the ranks on another job's GPUs: refused, naming torchrun, which keeps the variable."""
    value = e.get("CUDA_VISIBLE_DEVICES")
    if launcher != "deepspeed" or not (nodes > 1 or hostfile) or value is None:
        return
    if e.get("DS_ACCELERATOR", "cuda") not in ("", "cuda") or _cuda_gpus() == 0:
        return
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if ids[:ppn] != [str(i) for i in range(ppn)]:
        raise LaunchPlanError(f"CUDA_VISIBLE_DEVICES={value!r}: deepspeed on several nodes (or with a "
                              f"hostfile) starts the ranks on GPUs 0..{ppn - 1} of each node whatever this "
                              "variable says, so they would run on GPUs it does not list; use --launcher "
                              "torchrun (it keeps CUDA_VISIBLE_DEVICES), or let Slurm's ConstrainDevices "
                              "number each job's GPUs from 0")


def _port(value: int, source: str) -> int:
    if not is_tcp_port(value):
        raise LaunchPlanError(f"{source} {value} is not a TCP port (1-65535)")
    return value


def plan_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Fill what the flags leave open from the environment (Slurm allocation, MASTER_*), then check."""
    e = os.environ if env is None else env
    in_slurm = bool(e.get("SLURM_JOB_ID"))
    # inside a job step (srun) SLURM_NODEID and SLURM_STEP_NUM_NODES describe the step; in the batch script
    # or an salloc shell (no step) SLURM_NODEID is 0 whatever host it is, and a step may use fewer nodes
    # than the allocation has
    in_step = in_slurm and in_slurm_step(e)
    if args.nodes is not None:
        nodes = args.nodes
    else:
        step_nodes = env_int(e, "SLURM_STEP_NUM_NODES", 0) if in_step else 0
        nodes = step_nodes or env_int(e, "SLURM_JOB_NUM_NODES", 0) or env_int(e, "SLURM_NNODES", 0) or 1
    ppn = args.procs_per_node if args.procs_per_node is not None else _default_procs()
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if program and program[0].startswith("-"):
        raise LaunchPlanError(f"expected a pretrain subcommand after `--`, got {program[0]!r} "
                              "(e.g. `-- train --config c.yaml`)")
    program += cross_site_overrides(args)

    hosts = slurm_hosts(e)[:nodes] if in_slurm else []
    hostfile = args.hostfile
    listed = read_hostfile(hostfile) if hostfile else []  # checked now, not by the launcher on every node
    if hostfile and args.launcher in ("deepspeed", "mpirun") and nodes > len(listed):
        raise LaunchPlanError(f"--nodes {nodes} but hostfile {hostfile} lists {len(listed)} host(s)")
    if hostfile is None and args.launcher == "deepspeed" and nodes > 1 and hosts:
        hostfile = str(write_hostfile(hosts, ppn))

    _check_nodes_gpus(e, args.launcher, nodes, hostfile, ppn)
    explicit_addr = args.master_addr or e.get("MASTER_ADDR")
    master_addr: str | None = explicit_addr
    if master_addr is None and args.launcher != "mpirun":
        if nodes == 1 and not hostfile:
            master_addr = "127.0.0.1"
        elif hosts:
            master_addr = node_address(hosts[0])
        elif listed:
            master_addr = listed[0][0]
        else:
            raise LaunchPlanError(f"{nodes} nodes but no way to find rank 0: pass --master-addr (or "
                                  "--hostfile, or run inside a Slurm allocation)")
    if args.master_port is not None:
        master_port: int | None = _port(args.master_port, "--master-port")
    elif e.get("MASTER_PORT"):
        master_port = _port(env_int(e, "MASTER_PORT"), "MASTER_PORT")
    elif in_slurm:
        master_port = slurm_port(e)
    elif args.launcher == "mpirun":
        master_port = None  # rank 0 picks a free one and tells the others over MPI
    elif nodes == 1:
        master_port = free_port()  # concurrent single-node runs must not collide
    else:
        master_port = DEFAULT_PORT

    per_node_start = args.launcher == "torchrun" or args.no_ssh
    if args.node_rank is not None:
        node_rank = args.node_rank
    elif per_node_start and nodes > 1 and in_step and e.get("SLURM_NODEID"):
        node_rank = env_int(e, "SLURM_NODEID")
    else:
        node_rank = 0
    if args.launcher == "torchrun" and nodes > 1 and args.node_rank is None and not (
            in_step and e.get("SLURM_NODEID")):
        where = (" (this is the batch script or an salloc shell, outside a job step: start it once per node "
                 "with `srun --ntasks-per-node=1 pretrain launch ...`, which gives each its SLURM_NODEID)"
                 if in_slurm else "")
        raise LaunchPlanError(f"torchrun on {nodes} nodes: run it once per node with --node-rank{where}")

    return LaunchPlan(
        launcher=args.launcher, nodes=nodes, procs_per_node=ppn, train_args=tuple(program),
        master_addr=master_addr, master_port=master_port, node_rank=node_rank, hostfile=hostfile,
        no_ssh=args.no_ssh, launcher_args=tuple(shlex.split(args.launcher_args or "")),
        python=args.python or sys.executable, as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        mpi_flavor=_mpi_flavor(e) if args.launcher == "mpirun" else "openmpi",
        visible_devices=_visible_devices(e, args.launcher, nodes, hostfile),
    )


def cross_site_overrides(args: argparse.Namespace) -> list[str]:
    """`--site` / `--rendezvous` as config overrides, placed last so they win over the same keys given
    earlier. Both are YAML-quoted, so they stay strings whatever they look like (`--site 0`,
    `--rendezvous [::1]:29400`)."""
    out = []
    if getattr(args, "site", None):
        out.append(f"cross_site.site={json.dumps(args.site)}")
    if getattr(args, "rendezvous", None):
        _host_port("--rendezvous", args.rendezvous)
        out.append(f"cross_site.rendezvous={json.dumps(args.rendezvous)}")
    return out


def _host_port(flag: str, address: str) -> tuple[str, int]:
    from launch.rendezvous import parse_address  # imports torch: only when the flag is used

    try:
        return parse_address(address)
    except ValueError as e:
        raise LaunchPlanError(f"{flag} must be HOST:PORT: {e}") from None


def serve_rendezvous(address: str) -> int:
    """Serve the cross-site TCP store at `address` until SIGINT/SIGTERM: a store no site's death takes
    down (otherwise rank 0 of the first site on the address's host serves it)."""
    from launch.rendezvous import serve_store

    host, port = _host_port("--serve-rendezvous", address)
    try:
        store = serve_store(host, port, 600)
    except (RuntimeError, OSError) as e:
        raise LaunchPlanError(f"cannot serve the cross-site rendezvous at {address}: {e}") from e
    print(f"serving the cross-site rendezvous store at {host}:{store.port} (stop with Ctrl-C or SIGTERM); "
          f"it listens on port {store.port} of every interface of this host: keep that port closed to all "
          "but the sites (docs/cross_site.md)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0


def cmd_launch(args: argparse.Namespace) -> int:
    if args.serve_rendezvous:
        return serve_rendezvous(args.serve_rendezvous)
    if not args.launcher:
        raise LaunchPlanError(f"--launcher is required (one of {', '.join(LAUNCHERS)})")
    plan = plan_from_args(args)
    cmd = build_command(plan)
    if args.dry_run:
        print(render(cmd), flush=True)
        for written in written_hostfiles():  # removed when this process ends: show what it holds
            print(f"# {written} (written from SLURM_JOB_NODELIST, removed on exit) holds:\n"
                  + "".join(f"#   {line}\n" for line in written.read_text().splitlines()), end="",
                  file=sys.stderr, flush=True)
        return 0
    if shutil.which(cmd[0]) is None:
        raise LaunchPlanError(f"{cmd[0]}: no such program; is the {plan.launcher} launcher installed in this "
                              "environment and on PATH?")
    print(f"+ {render(cmd)}", file=sys.stderr, flush=True)
    if plan.launcher == "deepspeed":  # a child, not exec'd: its runner would die of SIGTERM at once
        from launch.supervise import run_supervised

        return run_supervised(cmd, to_launcher=plan.nodes > 1 and not plan.no_ssh)
    if plan.launcher == "torchrun":
        # Slurm signals every process of a step. torchrun dies on SIGUSR1 (its default action) and would
        # take the ranks down before they checkpoint; ignored here (inherited across exec), the ranks
        # still get it: the trainer installs its own handler (launch/signals.py).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execvp(cmd[0], cmd)
    return 127  # not reached


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction,
             data: argparse._SubParsersAction) -> None:
    """Add `pretrain launch` (called by pretrain/cli.py through REGISTRARS)."""
    p = sub.add_parser("launch", help="start training under deepspeed, torchrun, mpirun or srun",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", choices=LAUNCHERS, help="required unless --serve-rendezvous")
    p.add_argument("--nodes", type=int, help="nodes (default: inside a Slurm job step SLURM_STEP_NUM_NODES, "
                   "else SLURM_JOB_NUM_NODES, else 1)")
    p.add_argument("--procs-per-node", type=int, help="ranks per node (default: CUDA devices, else 1)")
    p.add_argument("--hostfile", help="`host slots=N` lines (deepspeed, mpirun); written from "
                                      "SLURM_JOB_NODELIST for deepspeed inside an allocation")
    p.add_argument("--master-addr", help="rank 0's address (default: MASTER_ADDR, the first Slurm node's "
                                         "NodeAddr, 127.0.0.1 on one node; mpirun: shared over MPI)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: MASTER_PORT; in Slurm 29500 + "
                   "job id %% 1000; one node: a free port in 20000-28999 (MMPT_PORT_RANGE); several nodes: "
                   "29500; mpirun: a free port rank 0 picks)")
    p.add_argument("--node-rank", type=int, help="this node's index for per-node starts (default: "
                                                 "SLURM_NODEID)")
    p.add_argument("--no-ssh", action="store_true", help="deepspeed: start only this node's ranks "
                                                         "(one launch per node, e.g. under srun)")
    p.add_argument("--launcher-args", help="extra launcher flags, one shell-quoted string, e.g. "
                                           "--launcher-args='--mca btl self,vader,tcp'")
    p.add_argument("--python", help="interpreter of the ranks (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--site", help="this site's name when training across sites (cross_site.site; the config "
                                  "sets cross_site.sites); docs/cross_site.md")
    p.add_argument("--rendezvous", metavar="HOST:PORT", help="where the sites meet (cross_site.rendezvous)")
    p.add_argument("--serve-rendezvous", metavar="HOST:PORT", help="only serve the cross-site store there, "
                                                                    "until stopped (no training)")
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="-- train ARGS",
                   help="the pretrain subcommand each rank runs")
    p.set_defaults(func=cmd_launch)  # LaunchPlanError is a ValueError: main() prints it and exits 2
