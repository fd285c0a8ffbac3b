"""The eval suite's outputs (`pretrain eval --suite`, pretrain/evaluation/suite.py): a markdown table per
checkpoint, the comparison table of checkpoints side by side, and a metric-against-step PNG. Kept apart from
the suite's checking and running so that the tables can be read (and changed) on their own. `suite` is a
`pretrain.evaluation.suite.Suite` (not imported: that module imports this one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cell(v: Any) -> str:
    """A table cell: 4 decimals for a float, a dash for a metric the dataset does not have."""
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def checkpoint_markdown(label: str, checkpoint: str, suite: Any, results: dict[str, dict[str, Any]]) -> str:
    """`<checkpoint>.md`: one row per dataset, one column per metric of any dataset."""
    metrics = list(dict.fromkeys(m for d in suite.datasets for m in d.metrics))
    rows = [[d.name, results[d.name]["samples"], *[results[d.name].get(m) if m in d.metrics else None
                                                   for m in metrics]] for d in suite.datasets]
    return f"# {label}\n\n`{checkpoint}`\n\n" + markdown_table(["dataset", "samples", *metrics], rows)


def comparison_markdown(labels: list[str], suite: Any, results: dict[str, dict[str, dict[str, Any]]]
                        ) -> str:
    """`comparison.md`: one row per (dataset, metric), one column per checkpoint."""
    rows = [[d.name, m, *[results[lab][d.name].get(m) for lab in labels]]
            for d in suite.datasets for m in d.metrics]
    return "# comparison\n\n" + markdown_table(["dataset", "metric", *labels], rows)


def plot_curves(metric: str, curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One line per (run, dataset) of `metric` against training step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
