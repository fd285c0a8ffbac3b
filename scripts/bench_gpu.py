#!/usr/bin/env python3
"""`make bench-gpu`: ViT-B/16 CLIP+MAE+MLM throughput and MFU with each fusion switch on/off and the
open_clip baseline, in one prepared run; appends a results table (date, device, git commit, command) to
docs/benchmarks.md (or --out).

Every variant is one `pretrain bench step --json --synthetic` subprocess (a crash or an unavailable kernel
cannot take the others down), starting from a plain baseline (torch AdamW, SDPA, nn.LayerNorm, no compile,
no checkpointing) and flipping one switch at a time, then all fusions together. A switch the device cannot
run (apex absent, DeepSpeed's fused Adam on CPU, a key the config does not have) is reported as
"unavailable: <reason>" from the config's own validation, and the run goes on. The baseline row also
trains open_clip's CLIP on the same batches (`--vs open_clip`, plus its patch_dropout=0.5 FLIP line).

    python scripts/bench_gpu.py                          # CUDA, ViT-B/16, micro-batch 256, bf16 (< 8 min)
    python scripts/bench_gpu.py --device cpu --tiny      # the same variants on a tiny model (CI / tests)
    python scripts/bench_gpu.py --skip compile           # leave the compile rows out (a row says so)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIT_B16 = ["model.image_size=224", "model.embed_dim=512", "model.vision.patch_size=16",
           "model.vision.width=768", "model.vision.layers=12", "model.vision.heads=12",
           "model.text.width=512", "model.text.layers=12", "model.text.heads=8",
           "model.text.context_length=77",
           "model.decoder.width=512", "model.decoder.layers=4", "model.decoder.heads=16",
           "data.vocab_size=4096", "train.micro_batch=256", "train.precision=bf16",
           "objectives.mim.mask_ratio=0.5"]
TINY = ["model.image_size=32", "model.embed_dim=16", "model.vision.patch_size=8", "model.vision.width=32",
        "model.vision.layers=1", "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "model.text.context_length=16", "model.decoder.width=16",
        "model.decoder.layers=1", "model.decoder.heads=2", "data.vocab_size=128", "train.micro_batch=8",
        "train.precision=bf16", "objectives.mim.mask_ratio=0.5"]
# every switch off: the reference each variant flips one thing against
BASELINE = ["optim.impl=torch", "model.attention=sdpa", "model.fused_layernorm=false", "train.compile=false",
            "train.activation_checkpointing=false", "objectives.contrastive.chunk=0", "train.fp8=false"]


def variants(tiny: bool) -> list[tuple[str, list[str]]]:
    chunk = 4 if tiny else 1024
    return [
        ("baseline (+ open_clip)", []),
        ("optim.impl=torch_fused", ["optim.impl=torch_fused"]),
        ("optim.impl=deepspeed_fused", ["optim.impl=deepspeed_fused"]),
        ("optim.impl=apex_fused", ["optim.impl=apex_fused"]),
        ("model.attention=math", ["model.attention=math"]),
        ("model.fused_layernorm=true", ["model.fused_layernorm=true"]),
        ("train.compile=true", ["train.compile=true"]),
        (WHOLE_COMPILE, ["train.compile=true", "train.compile_scope=model"]),
        ("train.fp8=true", ["train.fp8=true"]),
        ("train.precision=bf16_autocast", ["train.precision=bf16_autocast"]),
        ("train.activation_checkpointing=true", ["train.activation_checkpointing=true"]),
        (f"objectives.contrastive.chunk={chunk}", [f"objectives.contrastive.chunk={chunk}"]),
        (ALL_FUSIONS, []),  # filled in from the fusion rows that ran on this device
    ]


WHOLE_COMPILE = "train.compile_scope=model"
ALL_FUSIONS = "all available fusions"
# plus optim.impl=auto (never unavailable)
FUSIONS = ["model.fused_layernorm=true", "train.compile=true", "train.fp8=true"]


def whole_compile_faster(rows: list[dict]) -> bool:
    """Whether this run measured the whole-model compile faster than the per-block one (both ran)."""
    rate = {r["name"]: r.get("samples_per_s", 0.0) for r in rows if r["status"] == "ok"}
    return rate.get(WHOLE_COMPILE, 0.0) > rate.get("train.compile=true", float("inf"))


def unavailable_reason(overrides: list[str], env: dict[str, str], in_process: bool = False) -> str | None:
    """Why the config (with the device `env` selects) refuses these overrides, or None. Validation runs in
    a subprocess so the device choice (CUDA_VISIBLE_DEVICES) applies to its CUDA / apex checks, unless
    `in_process`: this process already sees the devices the variants will (about 3 s saved per variant)."""
    if in_process:
        from pretrain import config as C

        try:
            C.check_runtime(C.load_config(None, overrides))
        except Exception as e:  # any refusal becomes the row's reason, as in the subprocess below
            msg = " ".join(str(e).split())
            for prefix in ("invalid config: - ", "config cannot run on this machine: - "):
                msg = msg.replace(prefix, "")
            return msg or type(e).__name__
        return None
    code = ("import sys, json\nfrom pretrain import config as C\n"
            "try:\n    cfg = C.load_config(None, json.loads(sys.argv[1]))\n"
            "    check = getattr(C, 'check_runtime', None)\n"  # machine-dependent kernel checks
            "    if check is not None:\n        check(cfg)\n"
            "except Exception as e:\n    print(' '.join(str(e).split()))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "config check crashed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    msg = proc.stdout.strip()
    for prefix in ("invalid config: - ", "config cannot run on this machine: - "):
        msg = msg.replace(prefix, "")
    return msg or None


def run_variant(overrides: list[str], env: dict[str, str], steps: int, warmup: int, vs: bool,
                timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pretrain.cli", "bench", "step", "--synthetic", "--json",
           "--steps", str(steps), "--warmup", str(warmup)]
    if vs:
        cmd += ["--vs", "open_clip", "--vs-patch-dropout", "0.5"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"status": "failed: " + (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
    try:  # one variant's odd output must not cost the rows already measured
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as e:
        return {"status": f"failed: no JSON result on stdout ({type(e).__name__})"}
    res["status"] = "ok"
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return bool(out.strip())
    except (OSError, subprocess.CalledProcessError):
        return False


def markdown(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["name"].startswith("baseline") and r["status"] == "ok"), None)
    lines = [f"\n### `make bench-gpu`: {meta['device']}, {meta['model']}\n",
             f"{meta['date']}, {meta['device']}, torch {meta['torch']}, commit {meta['commit']}"
             f"{' plus uncommitted changes' if meta['dirty'] else ''}; {meta['steps']} timed steps after "
             f"{meta['warmup']} warm-up, synthetic batches, one process.\n",
             "```bash", meta["command"], "```\n",
             "| variant | samples/s | vs baseline | MFU | peak memory | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | - | - | - | - | {r['status'].replace('|', '/')} |")
            continue
        rel = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        mem = r["memory"]["peak_bytes"] / 2**30
        lines.append(f"| {r['name']} | {r['samples_per_s']:.1f} | {rel} | {r['mfu']:.1%} | {mem:.2f} GiB "
                     "| ok |")
        vs = r.get("vs_open_clip")
        for row, label in ((vs, "open_clip baseline (full images)"),
                           ((vs or {}).get("patch_dropout_run"), "open_clip, patch_dropout=0.5")):
            if row:
                mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
                mem = f"{row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else "-"
                lines.append(f"| {label} | {row['samples_per_s']:.1f} | ours / it = {row['ratio']:.2f}x | "
                             f"{mfu} | {mem} | ok |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (seconds per variant; CI)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file to append to")
    ap.add_argument("--json-out", help="also write every variant's JSON here")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 8, tiny 2)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per variant (default 3, tiny 1)")
    ap.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="variants whose name contains one of these get a 'skipped' row instead of a run "
                         "(e.g. `compile`: inductor's compile makes those rows the slowest on a CPU)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    args = ap.parse_args(argv)
    names = [name for name, _ in variants(args.tiny)]
    for flag in ("only", "skip"):  # a typo would otherwise append an empty or unchanged table to --out
        unmatched = [s for s in getattr(args, flag) or [] if not any(s in name for name in names)]
        if unmatched:
            ap.error(f"--{flag} {' '.join(unmatched)}: no variant name contains it; variants: "
                     + "; ".join(names))
    steps = args.steps or (2 if args.tiny else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    model = TINY if args.tiny else VIT_B16
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; use --device cpu --tiny", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for name, flips in variants(args.tiny):
        if args.only and not any(s in name for s in args.only):
            continue
        skipped_by = next((s for s in args.skip if s in name), None)
        if skipped_by is not None:  # still a row, so the table says what was left out and why
            rows.append({"name": name, "overrides": flips, "status": f"skipped: --skip {skipped_by}"})
            print(f"{name}: {rows[-1]['status']}", flush=True)
            continue
        if name == ALL_FUSIONS:
            ran = {f for r in rows if r["status"] == "ok" for f in r["overrides"]}
            flips = ["optim.impl=auto", *(f for f in FUSIONS if f in ran)]
            if "train.compile=true" in flips and whole_compile_faster(rows):
                flips.append("train.compile_scope=model")
            name = f"{ALL_FUSIONS} ({', '.join(flips)})"
        overrides = [*model, *BASELINE, *flips]
        # the subprocess check is needed only when the variants hide a GPU this process sees
        same_devices = args.device == "cuda" or not torch.cuda.is_available()
        reason = unavailable_reason(overrides, env, in_process=same_devices)
        if reason:
            row = {"status": f"unavailable: {reason}"}
        else:
            row = run_variant(overrides, env, steps, warmup, vs=name.startswith("baseline"),
                              timeout=args.timeout)
        row["name"] = name
        row["overrides"] = flips
        rows.append(row)
        ok = row["status"] == "ok"
        shown = f"{row['samples_per_s']} samples/s, MFU {row['mfu']:.1%}" if ok else row["status"]
        print(f"{name}: {shown}", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "commit": _git_commit(), "dirty": _dirty(), "steps": steps, "warmup": warmup,
            "model": "tiny CLIP+MAE+MLM" if args.tiny else
                     "ViT-B/16 CLIP+MAE+MLM (image 224, text 512x12 ctx 77, decoder 512x4, 50% masking, "
                     "micro-batch 256, bf16)",
            "command": "python scripts/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = markdown(rows, meta)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "variants": rows}, indent=1))
    print(table)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
