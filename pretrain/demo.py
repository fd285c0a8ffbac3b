"""`make demo`: the whole path on the embedded default, small enough for a 2-core machine.

synthetic shards -> `deepspeed` launcher with 2 CPU ranks (ZeRO-3, all three objectives) -> standard
DeepSpeed checkpoint -> zero-shot and retrieval eval on held-out shards -> one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launch.logs import quiet_launcher_env
from launch.rendezvous import free_port

TRAIN_SAMPLES, VAL_SAMPLES, PER_SHARD, SEED_TRAIN, SEED_VAL = 12000, 1000, 500, 0, 1
DEMO_EVAL_EVERY, DEMO_EVAL_SAMPLES = 100, 512


class DemoTrainingFailed(RuntimeError):
    """The demo's training ranks failed; they printed why. `pretrain demo` exits with their `status`."""

    def __init__(self, status: int):
        status = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell says
        super().__init__(f"demo training failed with exit status {status} (the ranks' errors are above)")
        self.status = status


def write_demo_shards(out: Path, samples: int, seed: int, image_size: int) -> None:
    """The demo's synthetic shards (PER_SHARD per shard), skipped when the same arguments wrote them."""
    from data_pipelines.synth import write_synthetic_shards

    stamp = out / ".complete"
    want = f"{samples} {PER_SHARD} {image_size} {seed}"
    if stamp.exists() and stamp.read_text() == want:
        return  # shards are deterministic: the same arguments wrote the same bytes before
    if out.exists():
        shutil.rmtree(out)
    write_synthetic_shards(out, samples=samples, samples_per_shard=PER_SHARD, image_size=image_size,
                           seed=seed)
    stamp.write_text(want)


def launcher_command(procs: int, config: Path, overrides: list[str], port: int) -> list[str]:
    """The deepspeed launcher line the demo runs (CPU: --num_accelerators sets the rank count).

    `--log_level error`: the launcher's INFO lines (its own command line, world info, one line per rank
    spawned and exited) and its warning that there is no hostfile (the demo is local by design) say
    nothing the demo's "+ ..." line does not; a rank that fails is still reported (an error)."""
    beside = Path(sys.executable).parent / "deepspeed"  # the venv's launcher, even when not activated
    exe = str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")
    return [exe, "--num_accelerators", str(procs), "--master_port", str(port), "--log_level", "error",
            "--no_local_rank", "--module", "pretrain.cli", "train", "--config", str(config), *overrides]


def run_demo(out: Path, procs: int = 2, overrides: list[str] | None = None) -> dict[str, Any]:
    from pretrain.config import embedded_config_path, load_config
    from pretrain.evaluation.evaluate import evaluate

    t0 = time.time()
    config = embedded_config_path("demo.yaml")
    n_shards = TRAIN_SAMPLES // PER_SHARD
    train_dir, val_dir = out / "data" / "train", out / "data" / "val"
    val_urls = f"{val_dir}/shard-{{000000..{VAL_SAMPLES // PER_SHARD - 1:06d}}}.tar"
    # the user's overrides, checked at the world size the demo launches, before any shard is written
    cfg = load_config(config, [f"data.val={val_urls}", *(overrides or [])], world_size=procs)
    write_demo_shards(train_dir, TRAIN_SAMPLES, SEED_TRAIN, cfg.model.image_size)
    write_demo_shards(val_dir, VAL_SAMPLES, SEED_VAL, cfg.model.image_size)
    run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
    train_urls = f"{train_dir}/shard-{{000000..{n_shards - 1:06d}}}.tar"
    # validation every DEMO_EVAL_EVERY steps on DEMO_EVAL_SAMPLES held-out samples: val/ rows in
    # metrics.jsonl show zero-shot rising while it trains (user overrides come later: eval.every=0 is off)
    evals = [f"eval.every={DEMO_EVAL_EVERY}", f"eval.max_samples={DEMO_EVAL_SAMPLES}"]
    cmd = launcher_command(procs, config, [f"data.train={train_urls}", f"data.val={val_urls}", *evals,
                                           f"run.dir={run_dir}", *(overrides or [])], free_port())
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    status = subprocess.run(cmd, env=quiet_launcher_env(dict(os.environ))).returncode
    if status != 0:
        raise DemoTrainingFailed(status)
    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate(run_dir, val_urls, val_dir / "classnames.txt")
    from pretrain.metrics import read_metrics

    curve = {r["step"]: r["val/zeroshot_top1"] for r in read_metrics(run_dir) if "val/zeroshot_top1" in r}
    return {
        "zeroshot_top1": result["zeroshot_top1"], "chance": result["chance"], "i2t_r1": result["i2t_r1"],
        "t2i_r1": result["t2i_r1"], "zeroshot_top5": result["zeroshot_top5"],
        "steps": summary["steps"], "samples_per_s": summary["samples_per_s"],
        "wall_s": round(time.time() - t0, 1), "run_dir": str(run_dir),
        "val_zeroshot_top1_by_step": curve, "validation_s": summary.get("validation_s"),
    }
