"""What `pretrain bench cross-site` reports: the zero-shot gap and byte ratios over its jobs, the markdown
table, and with `--curve` each job's zero-shot at every checkpoint it kept (the long runs of #19 in
docs/benchmarks.md score the sites and the synchronous job at the same steps, so the gap shows over
training, not at one step) and how many samples the sites need to reach each of the synchronous job's
scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVE_KEYS = ("zeroshot_top1", "i2t_r1", "t2i_r1")


def curve(run_dir: Path, val: str, classnames: str | Path) -> list[dict[str, Any]]:
    """One row per complete checkpoint of the run (`pretrain eval --suite`'s `run_tags`: only tags with the
    completion marker, in step order): the step and CURVE_KEYS on the held-out shards `val`. The last row is
    the final model's score, as the job's own."""
    from pretrain.checkpoint.atomic import step_of
    from pretrain.evaluation.evaluate import evaluate
    from pretrain.evaluation.suite import run_tags

    root, tags = run_tags(run_dir) or (run_dir, [])
    rows = []
    for tag in tags:
        r = evaluate(root / tag, val, classnames)
        rows.append({"step": step_of(tag), **{k: r[k] for k in CURVE_KEYS}})
    return rows


def samples_to_match(reference: list[dict[str, Any]], other: list[dict[str, Any]],
                     key: str = "zeroshot_top1") -> list[dict[str, Any]]:
    """For each checkpoint of `reference`: the step at which `other` first reaches its `key` value (linear
    between `other`'s checkpoints) and that step over the reference's. The synchronous job and the sites
    run the same ranks' micro-batches per step in this bench (sites x ranks per site), so the ratio is the
    samples `other` needs for the same score. `other_step` is None where its curve does not bracket the
    value: reached at or before its first checkpoint (crossing unknown) or never; `why` says which."""
    pts = [(r["step"], r[key]) for r in other]
    rows = []
    for ref in reference:
        target = ref[key]
        row: dict[str, Any] = {"step": ref["step"], key: target, "other_step": None, "ratio": None}
        crossing = next(((s0, v0, s1, v1) for (s0, v0), (s1, v1) in zip(pts, pts[1:]) if v0 < target <= v1),
                        None)
        if pts and pts[0][1] >= target:
            row["why"] = f"reached at or before its first checkpoint (step {pts[0][0]})"
        elif crossing is None:
            row["why"] = "not reached by its last checkpoint"
        else:
            s0, v0, s1, v1 = crossing
            at = s0 + (s1 - s0) * (target - v0) / (v1 - v0)
            row.update(other_step=round(at, 1), ratio=round(at / ref["step"], 2))
        rows.append(row)
    return rows


def summarize(jobs: dict[str, dict[str, Any]], samples: int) -> dict[str, Any]:
    """Adds `link_bytes_per_sample` to each job with link bytes; returns the zero-shot gap (sync - sites,
    points) and each synchronous job's bytes per sample over the sites' (`bytes_ratio_<job>_vs_sites`)."""
    out: dict[str, Any] = {}
    for job in jobs.values():
        if job.get("link_bytes") is not None:
            job["link_bytes_per_sample"] = round(job["link_bytes"] / job.get("samples_seen", samples), 1)
    per = {k: v.get("link_bytes_per_sample") for k, v in jobs.items()}
    if per.get("sites"):
        for base in ("dp", "sync"):
            if per.get(base):
                out[f"bytes_ratio_{base}_vs_sites"] = round(per[base] / per["sites"], 1)
    if "zeroshot_top1" in jobs.get("sync", {}) and "zeroshot_top1" in jobs.get("sites", {}):
        out["zeroshot_gap_points"] = round(
            100 * (jobs["sync"]["zeroshot_top1"] - jobs["sites"]["zeroshot_top1"]), 2
        )
    if jobs.get("sync", {}).get("curve") and jobs.get("sites", {}).get("curve"):
        out["sites_samples_to_match_sync"] = samples_to_match(jobs["sync"]["curve"], jobs["sites"]["curve"])
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as docs/benchmarks.md shows it: the command, one row per job, the ratios, the curves."""
    lines = [
        f"`{report['command']}` (commit {report['commit']}, {report['date']}; {report['link']}; "
        f"{report['samples_seen']} samples seen per job)",
        "",
        "| job | zero-shot top-1 | top-5 | i2t R@1 | t2i R@1 | wall s | link bytes | link bytes / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, spec: str = ".3f") -> str:
        return "-" if v is None else format(v, spec)

    for name, j in report["jobs"].items():
        lines.append(
            f"| {name} | {f(j.get('zeroshot_top1'))} | {f(j.get('zeroshot_top5'))} | "
            f"{f(j.get('i2t_r1'))} | {f(j.get('t2i_r1'))} | {f(j['wall_s'], '.0f')} | "
            f"{f(j.get('link_bytes'), ',')} | {f(j.get('link_bytes_per_sample'), ',.0f')} |"
        )
    for key in ("zeroshot_gap_points", "bytes_ratio_dp_vs_sites", "bytes_ratio_sync_vs_sites"):
        if key in report:
            lines.append(f"\n{key}: {report[key]}")
    for m in report.get("sites_samples_to_match_sync", []):  # --curve: how many more samples the sites need
        where = (f"the sites: {m['why']}" if m["other_step"] is None
                 else f"the sites at step {m['other_step']:g} ({m['ratio']:g}x the samples)")
        lines.append(f"\nsync's zero-shot at step {m['step']} ({m['zeroshot_top1']:.3f}): {where}")
    curves = {n: {row["step"]: row for row in j["curve"]} for n, j in report["jobs"].items() if "curve" in j}
    if curves:  # one row per step any job kept a checkpoint at; zero-shot top-1 / i2t R@1 / t2i R@1
        lines += ["", "| step | " + " | ".join(f"{n} top-1 / i2t / t2i" for n in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for step in sorted({s for c in curves.values() for s in c}):
            cells = [" / ".join(f(c[step][k]) for k in CURVE_KEYS) if step in c else "-"
                     for c in curves.values()]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
