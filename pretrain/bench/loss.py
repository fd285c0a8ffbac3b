"""`pretrain bench loss`: peak memory of the plain vs the tiled contrastive loss (forward + backward).

Each variant runs `contrastive_loss` on fp32 features img, txt [B, D] (leaves with gradients) and a
learned scale, then backward, and reports the peak memory *beyond the inputs*:

* **measured** on CUDA: `torch.cuda.max_memory_allocated` after resetting the peak, in this process;
* **measured** on CPU: in a fresh subprocess per variant, the peak resident set (VmHWM, reset through
  /proc/self/clear_refs once the inputs exist) minus the resident set at that moment, so allocator
  caching or an earlier variant cannot leak into the number;
* **computed** where measuring is not possible or not asked for (the plain loss at B = 65536 needs
  several 16 GiB logit matrices): the byte count of the tensors alive at the peak, from the formulas in
  `computed_peak_bytes` (checked against measurements at sizes where both run; see docs/benchmarks.md).

The JSON says which one each number is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

FP32 = 4


def computed_peak_bytes(variant: str, batch: int, dim: int, chunk: int, loss: str) -> int:
    """Bytes alive at the peak of forward + backward, beyond the inputs (fp32, one process).

    The per-matrix counts are what autograd keeps, checked against CPU measurements at B = 4096 and
    8192, D = 512 (docs/benchmarks.md; measured was within +10% of these, never below by more):
    plain InfoNCE: both B x B logit matrices and their log-softmax saved for backward, whose
    gradients replace them on the way back (4 B^2); plain SigLIP: the logits, their signed copy and
    log-sigmoid buffers (5 B^2); both also hold the normalised features and their gradients (4 B D).
    tiled: about ten B x D feature-sized tensors (normalised copies, the Functions' gradient buffers,
    the gradients flowing into the inputs), the per-row log-sum-exps and ~8 chunk x chunk tiles.
    """
    if variant == "plain":
        copies = 4 if loss == "infonce" else 5
        return copies * batch * batch * FP32 + 4 * batch * dim * FP32
    c = min(chunk, batch)
    return 10 * batch * dim * FP32 + 8 * c * c * FP32 + 4 * batch * FP32


def _inputs(batch: int, dim: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.randn(batch, dim, device=device, generator=gen).requires_grad_()
    txt = torch.randn(batch, dim, device=device, generator=gen).requires_grad_()
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return [img, txt, scale, bias]


def _step(inputs: list[torch.Tensor], chunk: int, loss: str) -> float:
    from pretrain.objectives import contrastive_loss

    img, txt, scale, bias = inputs
    out = contrastive_loss(img, txt, scale, loss=loss, chunk=chunk,
                           logit_bias=bias if loss == "siglip" else None)
    out.backward()
    return float(out.detach())


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def measure_in_this_process(batch: int, dim: int, chunk: int, loss: str, device: str) -> dict[str, Any]:
    """Run one variant here; peak bytes beyond the inputs (CUDA allocator, or CPU resident set)."""
    dev = torch.device(device)
    inputs = _inputs(batch, dim, dev)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        value = _step(inputs, chunk, loss)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        how = "torch.cuda.max_memory_allocated"
    else:
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        value = _step(inputs, chunk, loss)
        peak = _status_bytes("VmHWM") - base
        how = "peak RSS (VmHWM) delta in a fresh process"
    return {"peak_bytes": int(peak), "how": how, "loss_value": value,
            "seconds": round(time.perf_counter() - t0, 3)}


def _measure_subprocess(batch: int, dim: int, chunk: int, loss: str) -> dict[str, Any]:
    """CPU: a fresh interpreter per variant, so nothing earlier sits in the resident set."""
    args = json.dumps({"batch": batch, "dim": dim, "chunk": chunk, "loss": loss, "device": "cpu"})
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench.loss", args], capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"bench loss child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _status_bytes_meminfo("MemAvailable")


def _status_bytes_meminfo(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_bench(batch: int, dim: int, chunk: int = 1024, loss: str = "infonce", measure_max_batch: int = 16384,
              device: str | None = None) -> dict[str, Any]:
    """Plain vs tiled peak memory (measured where it fits and batch <= measure_max_batch, else computed)."""
    if batch < 2 or dim < 1 or chunk < 1:
        raise ValueError("--batch must be >= 2, --dim and --chunk >= 1")
    if loss not in ("infonce", "siglip"):
        raise ValueError(f"--loss {loss!r} is not one of infonce, siglip")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    avail = _available_bytes(dev)
    result: dict[str, Any] = {"batch": batch, "dim": dim, "chunk": chunk, "loss": loss, "device": str(dev),
                              "dtype": "float32", "variants": {}}
    for variant, c in (("plain", 0), ("tiled", chunk)):
        computed = computed_peak_bytes(variant, batch, dim, chunk, loss)
        row: dict[str, Any] = {"chunk": c, "computed_bytes": computed}
        if batch <= measure_max_batch and computed < 0.6 * avail:
            got = (measure_in_this_process(batch, dim, c, loss, str(dev)) if dev.type == "cuda"
                   else _measure_subprocess(batch, dim, c, loss))
            row.update({"peak_bytes": got["peak_bytes"], "source": "measured", "how": got["how"],
                        "seconds": got["seconds"], "loss_value": got["loss_value"]})
        else:
            why = (f"batch > --measure-max-batch {measure_max_batch}" if batch > measure_max_batch
                   else f"needs ~{computed / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
            row.update({"peak_bytes": computed, "source": "computed", "why": why})
        result["variants"][variant] = row
    plain, tiled = result["variants"]["plain"], result["variants"]["tiled"]
    result["ratio"] = round(tiled["peak_bytes"] / plain["peak_bytes"], 5)
    result["plain_over_tiled"] = round(plain["peak_bytes"] / tiled["peak_bytes"], 1)
    if plain["source"] == tiled["source"] == "measured":
        result["loss_abs_diff"] = abs(plain["loss_value"] - tiled["loss_value"])
    result["target"] = "tiled peak <= plain / 20 (the issue sets it at --batch 65536 --dim 512)"
    result["target_met"] = result["ratio"] <= 1 / 20
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def add_loss_parser(bench: argparse._SubParsersAction) -> None:
    """`pretrain bench loss` arguments (registered by `pretrain.bench.commands`)."""
    p = bench.add_parser("loss", help="peak memory of the plain vs tiled contrastive loss (fwd + bwd)")
    p.add_argument("--batch", type=int, required=True, help="rows = columns of the logit matrix")
    p.add_argument("--dim", type=int, required=True, help="embedding dimension")
    p.add_argument("--chunk", type=int, default=1024, help="tile size of the tiled loss")
    p.add_argument("--loss", choices=("infonce", "siglip"), default="infonce")
    p.add_argument("--measure-max-batch", type=int, default=16384,
                   help="measure variants only up to this batch (the rest are computed)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_loss)


def cmd_bench_loss(args: argparse.Namespace) -> int:
    res = run_bench(args.batch, args.dim, args.chunk, args.loss, args.measure_max_batch, args.device)
    if args.json:
        print(json.dumps(res), flush=True)
        return 0
    print(f"contrastive loss {res['loss']}, B={res['batch']}, D={res['dim']}, fp32, {res['device']}")
    for name, row in res["variants"].items():
        print(f"  {name:<6} chunk {row['chunk']:<6} peak {_gib(row['peak_bytes'])} ({row['source']}; "
              f"computed {_gib(row['computed_bytes'])})")
    print(f"  tiled / plain = {res['ratio']} (1/{res['plain_over_tiled']}); target <= 1/20: "
          f"{'met' if res['target_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":  # child process of _measure_subprocess: one variant, one JSON line
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_in_this_process(spec["batch"], spec["dim"], spec["chunk"], spec["loss"],
                                             spec["device"])), flush=True)
