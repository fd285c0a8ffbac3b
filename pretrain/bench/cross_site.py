"""`pretrain bench cross-site`: does training across sites keep the model, and how few bytes cross the link?

One run, the demo's recipe and data (`pretrain demo`'s synthetic shards, one tokenizer for every job;
`--train-samples` fewer for a quick check, as tests/e2e/test_bench_cross_site.py does), equal samples seen:

- `sync`: one synchronous ZeRO-3 job of sites x ranks-per-site ranks over all shards;
- `sites`: `--sites` sites of `--ranks-per-site` ranks, each reading only its own 1/sites of the shards,
  the DiLoCo outer loop every `--every` steps with the `--compress` exchange (`cross_site.*`);
- `alone` (not in the default `--jobs`): site a by itself, its shards and ranks, no outer loop: what one
  site learns from its share alone (DiLoCo's one-replica reference), so the sites' gain from each other shows;
- `dp` (bytes only): the synchronous job as plain data parallelism (ZeRO stage 0), whose every-step
  gradient all-reduce is what the sites replace; two short runs (`--dp-steps N1 N2`) measure its start-up
  and per-step bytes, from which its bytes for `--steps` steps follow.

Quality: zero-shot top-1/top-5 and retrieval R@1 of each final model on the demo's held-out shards.
Bytes: with root, each job is split over two network namespaces joined by one veth link (site a / node 0
on one side, site b / node 1 on the other; `launch/netns.py`), and what crossed is read from that link's
kernel counters, both directions: the same counter for all three jobs, whatever the protocol (gloo
collectives, the cross-site store, heartbeats). The link is not rate-limited here (the slow-link
behaviour is tests/e2e/test_cross_site.py's). Without root the jobs run on loopback and only the sites'
own payload counter (`cross_site_bytes`) is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from launch.netns import Host, netns_pair, unavailable
from launch.ports import free_port
from parallel.cross_site_codec import CODECS
from pretrain.bench.cross_site_report import curve, markdown, summarize
from pretrain.bench.overrides import owned_key_problems

ROOT = Path(__file__).resolve().parents[2]


def _data(out: Path, train_samples: int) -> dict[str, Any]:
    """The demo's train / held-out shards (`train_samples` of the first: the demo's 12,000 by default) and
    one tokenizer trained on the train captions. Both are reused on a rerun into the same `--out`, the
    tokenizer only while it was trained on the shards there now (another `--train-samples` rewrites them)."""
    from data_pipelines.tokenizer import train_tokenizer_from_shards
    from pretrain.config import embedded_config_path, load_config
    from pretrain.demo import PER_SHARD, SEED_TRAIN, SEED_VAL, VAL_SAMPLES, write_demo_shards

    cfg = load_config(embedded_config_path("demo.yaml"), [])
    train, val = out / "data" / "train", out / "data" / "val"
    write_demo_shards(train, train_samples, SEED_TRAIN, cfg.model.image_size)
    write_demo_shards(val, VAL_SAMPLES, SEED_VAL, cfg.model.image_size)
    tokenizer, trained_on = out / "data" / "tokenizer.json", out / "data" / "tokenizer.shards"
    shards_written = (train / ".complete").read_text()  # write_demo_shards' stamp of what train/ holds
    n = train_samples // PER_SHARD
    urls = f"{train}/shard-{{000000..{n - 1:06d}}}.tar"
    if not (tokenizer.exists() and trained_on.exists() and trained_on.read_text() == shards_written):
        train_tokenizer_from_shards(urls, cfg.data.vocab_size, cfg.data.tokenizer_samples).save(tokenizer)
        trained_on.write_text(shards_written)
    return {
        "train": str(train),
        "shards": n,
        "urls": urls,
        "tokenizer": str(tokenizer),
        "val": f"{val}/shard-{{000000..{VAL_SAMPLES // PER_SHARD - 1:06d}}}.tar",
        "classnames": str(val / "classnames.txt"),
    }


def _train_args(
    data: dict[str, Any], urls: str, run_dir: Path, args: argparse.Namespace, *extra: str
) -> list[str]:
    from pretrain.config import embedded_config_path

    return [
        "train",
        "--overwrite-run",  # a rerun of the bench with the same --out trains each job again from scratch
        "--config",
        str(embedded_config_path("demo.yaml")),
        f"data.train={urls}",
        f"data.tokenizer={data['tokenizer']}",
        f"run.dir={run_dir}",
        f"train.micro_batch={args.micro_batch}",
        f"train.steps={args.steps}",
        f"checkpoint.every={args.steps}",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"parallel.timeout_s={args.timeout_s + 120}",
        *args.set,
        *extra,
    ]


class Job:
    """The processes of one job (one per namespace or site), their logs, and the link bytes they moved."""

    def __init__(self, name: str, out: Path) -> None:
        self.name, self.out, self.procs = name, out, []
        self.logs: list[Path] = []

    def start(self, prefix: list[str], argv: list[str], tag: str) -> None:
        log = self.out / f"{self.name}-{tag}.log"
        self.logs.append(log)
        with log.open("w") as fh:
            self.procs.append(
                subprocess.Popen(
                    [*prefix, sys.executable, "-m", "pretrain.cli", *argv],
                    cwd=ROOT,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                codes.append(-9)
        if any(codes):
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2500:]}" for log in self.logs)
            raise RuntimeError(f"bench cross-site: job {self.name} failed (exit codes {codes})\n{tails}")


def _run_job(
    name: str,
    out: Path,
    hosts: tuple[Host, Host] | None,
    starts: list[tuple[int, list[str]]],
    timeout_s: float,
) -> dict[str, Any]:
    """Start each (side, argv) in its namespace (or on loopback), wait; wall time and link bytes."""
    job = Job(name, out)
    before = hosts[1].link_bytes() if hosts else (0, 0)
    t0 = time.perf_counter()
    for side, argv in starts:
        # a synchronous job's ranks span both sides (gloo on the link); a site's stay on its loopback
        prefix = (
            hosts[side].prefix(f"GLOO_SOCKET_IFNAME={'lo' if name == 'sites' else 'tnet0'}") if hosts else []
        )
        job.start(prefix, argv, f"{side}")
    job.wait(timeout_s)
    wall = time.perf_counter() - t0
    sent, received = hosts[1].link_bytes() if hosts else (0, 0)
    return {
        "wall_s": round(wall, 1),
        "link_bytes": (sent - before[0] + received - before[1]) if hosts else None,
    }


def _sync_starts(
    data: dict[str, Any],
    run_dir: Path,
    args: argparse.Namespace,
    hosts: tuple[Host, Host] | None,
    *extra: str,
) -> list[tuple[int, list[str]]]:
    """One synchronous job: with namespaces, two torchrun "nodes" of ranks-per-site ranks; else one
    deepspeed launcher with every rank on this host."""
    train = _train_args(data, data["urls"], run_dir, args, *extra)
    n = args.sites * args.ranks_per_site
    if hosts is None:
        return [(0, ["launch", "--launcher", "deepspeed", "--procs-per-node", str(n),
                     "--master-port", str(free_port()), "--", *train])]
    # inside the private namespaces nothing else listens: a fixed port is safe there
    return [(side, ["launch", "--launcher", "torchrun", "--nodes", "2", "--procs-per-node", str(n // 2),
                    "--node-rank", str(side), "--master-addr", hosts[0].addr, "--master-port", "29500",
                    "--", *train])
            for side in (0, 1)]


def _site_urls(data: dict[str, Any], args: argparse.Namespace, i: int) -> str:
    """Site i's shards: [i * per, (i + 1) * per) of the demo's, per = shards // sites."""
    per = data["shards"] // args.sites
    return f"{data['train']}/shard-{{{i * per:06d}..{(i + 1) * per - 1:06d}}}.tar"


def _alone_starts(
    data: dict[str, Any], run_dir: Path, args: argparse.Namespace
) -> list[tuple[int, list[str]]]:
    """Site a's job without the outer loop (no `cross_site.*`, no --site): its shards, its ranks."""
    train = _train_args(data, _site_urls(data, args, 0), run_dir, args)
    return [(0, ["launch", "--launcher", "deepspeed", "--procs-per-node", str(args.ranks_per_site),
                 "--master-port", str(free_port()), "--", *train])]


def _site_starts(
    data: dict[str, Any], out: Path, args: argparse.Namespace, hosts: tuple[Host, Host] | None
) -> list[tuple[int, list[str]]]:
    rendezvous = f"{hosts[0].addr}:29470" if hosts else f"127.0.0.1:{free_port()}"
    starts = []
    for i in range(args.sites):  # site i reads only its own shards
        train = _train_args(
            data,
            _site_urls(data, args, i),
            out / "runs" / f"site{i}",
            args,
            f"cross_site.sites={args.sites}",
            f"cross_site.every={args.every}",
            f"cross_site.compress={args.compress}",
            f"cross_site.timeout_s={args.timeout_s}",
        )
        site = "ab"[i] if args.sites == 2 else f"s{i}"
        starts.append((min(i, 1), ["launch", "--launcher", "deepspeed", "--procs-per-node",
                                   str(args.ranks_per_site), "--master-port", str(free_port()),
                                   "--site", site, "--rendezvous", rendezvous, "--", *train]))
    return starts


def _dp_bytes(
    data: dict[str, Any], out: Path, args: argparse.Namespace, hosts: tuple[Host, Host]
) -> dict[str, Any]:
    """Plain data parallelism's link bytes for `--steps` steps, without training that long: two short
    ZeRO-0 runs (`--dp-steps` N1 N2) give the start-up cost (the initial weight broadcast, once) and the
    per-step cost (the gradient all-reduce); the job's bytes are start-up + steps x per-step."""
    n1, n2 = args.dp_steps
    measured = {}
    for n in (n1, n2):
        dp_args = argparse.Namespace(**{**vars(args), "steps": n})
        starts = _sync_starts(data, out / "runs" / f"dp{n}", dp_args, hosts, "parallel.zero_stage=0")
        measured[n] = _run_job(f"dp{n}", out / "logs", hosts, starts, args.job_timeout_s)
    per_step = (measured[n2]["link_bytes"] - measured[n1]["link_bytes"]) / (n2 - n1)
    startup = measured[n1]["link_bytes"] - n1 * per_step
    return {
        "wall_s": measured[n1]["wall_s"] + measured[n2]["wall_s"],
        "samples_seen": args.steps * args.micro_batch * args.sites * args.ranks_per_site,
        "link_bytes": round(startup + args.steps * per_step),
        "link_bytes_per_step": round(per_step),
        "link_bytes_startup": round(startup),
        "measured": {str(n): m["link_bytes"] for n, m in measured.items()},
    }


def _quality(run_dir: Path, data: dict[str, Any], with_curve: bool = False) -> dict[str, Any]:
    """The final model's scores; with `with_curve` (`--curve`) also every kept checkpoint's (`curve`)."""
    from pretrain.evaluation.evaluate import evaluate

    r = evaluate(run_dir, data["val"], data["classnames"])
    scores = {k: r[k] for k in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")}
    return {**scores, "curve": curve(run_dir, data["val"], data["classnames"])} if with_curve else scores


OWNED = {"train.micro_batch": "--micro-batch", "train.steps": "--steps", "cross_site.sites": "--sites",
         "cross_site.every": "--every", "cross_site.compress": "--compress",
         "cross_site.timeout_s": "--timeout-s", "data.train": None, "data.tokenizer": None, "run.dir": None}
"""Keys the bench sets itself: a `--set` of one would be overridden silently or break the report's counts."""


def check_args(args: argparse.Namespace, per_shard: int) -> None:
    """Refuse, naming the flag, what would fail only after minutes of training or give a wrong number."""
    n1, n2 = args.dp_steps
    samples = args.train_samples
    shards = samples // per_shard
    problems = [msg for bad, msg in [
        (samples < per_shard or samples % per_shard,
         f"--train-samples {samples} must be a positive multiple of {per_shard} (the demo's shard size)"),
        (args.sites < 2, f"--sites {args.sites}: training across sites needs at least 2"),
        (args.sites > shards, f"--sites {args.sites}: the data has only {shards} shards"),
        (args.ranks_per_site < 1, f"--ranks-per-site {args.ranks_per_site} must be >= 1"),
        (args.every < 1 or args.every > args.steps,
         f"--every {args.every} must be in [1, --steps {args.steps}]: no outer round would run"),
        (args.micro_batch < 1, f"--micro-batch {args.micro_batch} must be >= 1"),
        ("dp" in args.jobs and not 1 <= n1 < n2,
         f"--dp-steps {n1} {n2}: need 1 <= N1 < N2 (the per-step bytes are their difference / (N2 - N1))"),
        (getattr(args, "curve", False) and any(a.startswith("checkpoint.dir=") for a in args.set),
         "--curve scores the checkpoints in each job's run folder: leave checkpoint.dir unset"),
    ] if bad] + owned_key_problems(getattr(args, "set", None), OWNED)
    if problems:
        raise ValueError("bench cross-site: " + "; ".join(problems))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.demo import PER_SHARD
    from pretrain.metrics import read_metrics

    check_args(args, PER_SHARD)  # before any data is written
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = _data(out, args.train_samples)
    why = (
        "--no-netns" if args.no_netns else unavailable() or (None if args.sites == 2 else "--sites is not 2")
    )
    use_netns = why is None
    samples = args.steps * args.micro_batch * args.sites * args.ranks_per_site
    report: dict[str, Any] = {
        "samples_seen": samples,
        "sites": args.sites,
        "ranks_per_site": args.ranks_per_site,
        "every": args.every,
        "compress": args.compress,
        "steps": args.steps,
        "link": "two network namespaces, one veth link" if use_netns else f"loopback ({why})",
    }
    with ExitStack() as stack:
        hosts = stack.enter_context(netns_pair("10.78.0")) if use_netns else None
        jobs: dict[str, dict[str, Any]] = {}
        if "sync" in args.jobs:
            run_dir = out / "runs" / "sync"
            jobs["sync"] = _run_job(
                "sync", out / "logs", hosts, _sync_starts(data, run_dir, args, hosts), args.job_timeout_s
            )
            jobs["sync"].update(_quality(run_dir, data, args.curve), samples_seen=samples)
        if "sites" in args.jobs:
            jobs["sites"] = _run_job(
                "sites", out / "logs", hosts, _site_starts(data, out, args, hosts), args.job_timeout_s
            )
            site0 = out / "runs" / "site0"
            jobs["sites"].update(_quality(site0, data, args.curve), samples_seen=samples)
            last = [r for r in read_metrics(site0) if "cross_site_bytes" in r][-1]
            jobs["sites"]["payload_bytes_site0"] = last["cross_site_bytes"]
            jobs["sites"]["rounds"] = last["cross_site_round"]
            if args.sites > 1:  # every site applies the same average: equal final models
                jobs["sites"]["site1_zeroshot_top1"] = _quality(out / "runs" / "site1", data)["zeroshot_top1"]
        if "alone" in args.jobs:  # on loopback: nothing of it crosses the link
            run_dir = out / "runs" / "alone"
            jobs["alone"] = _run_job("alone", out / "logs", None, _alone_starts(data, run_dir, args),
                                     args.job_timeout_s)
            jobs["alone"].update(_quality(run_dir, data, args.curve),
                                 samples_seen=args.steps * args.micro_batch * args.ranks_per_site)
        if "dp" in args.jobs and hosts is not None:
            jobs["dp"] = _dp_bytes(data, out, args, hosts)
    report["jobs"] = jobs
    report.update(summarize(jobs, samples))
    return report


def cmd_cross_site(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run(args)
    report["commit"] = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        or "unknown"
    )
    report["command"] = "pretrain " + " ".join(sys.argv[1:])
    report["date"] = str(datetime.date.today())
    (Path(args.out) / "cross_site.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report) if args.json else markdown(report))
    return 0


def add_cross_site_parser(bench: argparse._SubParsersAction) -> None:
    from pretrain.demo import PER_SHARD, TRAIN_SAMPLES

    p = bench.add_parser("cross-site", description=__doc__.splitlines()[0],
                         help="training across sites vs one synchronous job: zero-shot at equal samples "
                         "seen, and bytes over the link between them")
    p.add_argument("--out", required=True, help="folder for data, runs, logs and cross_site.json")
    p.add_argument("--jobs", nargs="+", default=["sync", "sites", "dp"],
                   choices=["sync", "sites", "alone", "dp"])
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--ranks-per-site", type=int, default=2)
    p.add_argument("--every", type=int, default=20, help="cross_site.every (H)")
    p.add_argument("--compress", default="int8", choices=list(CODECS))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every job (the demo's 300)")
    p.add_argument("--micro-batch", type=int, default=32, help="per rank (4 ranks x 32 = the demo's 128)")
    p.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES,
                   help=f"training samples, a multiple of {PER_SHARD} (the demo's {TRAIN_SAMPLES:,} in "
                   f"{TRAIN_SAMPLES // PER_SHARD} shards; each site reads 1/sites of them)")
    p.add_argument("--dp-steps", type=int, nargs=2, default=[5, 15], metavar=("N1", "N2"),
                   help="steps of the two bytes-only ZeRO-0 runs")
    p.add_argument("--timeout-s", type=int, default=300,
                   help="cross_site.timeout_s (parallel.timeout_s: 120 s more)")
    p.add_argument("--job-timeout-s", type=int, default=3600)
    p.add_argument("--no-netns", action="store_true", help="run on loopback even as root (no link bytes)")
    p.add_argument("--curve", action="store_true",
                   help="also score every checkpoint each job kept (`--set checkpoint.every=N`) into "
                   "jobs.<job>.curve: step, zero-shot top-1, i2t and t2i R@1")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every job")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cross_site)
