"""PNG plots of training curves from `metrics.jsonl` (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf.tracking import read_metrics

COLUMNS = 3  # panels per row: six curves (PPO) make a 2 x 3 grid, not one strip too wide to read


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[str], title: str) -> Path | None:
    """One panel per key that appears in the metrics, `COLUMNS` to a row; None when none of them does."""
    rows = read_metrics(metrics_path)
    series = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            series[key] = pts
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(series), COLUMNS)
    rows = math.ceil(len(series) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    panels = list(axes.flat)
    for ax, (key, pts) in zip(panels, series.items(), strict=False):  # the grid can have empty places
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in panels[len(series):]:  # the last row's empty places
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
