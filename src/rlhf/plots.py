"""PNG plots of training curves from `metrics.jsonl` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from rlhf.tracking import read_metrics


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[str], title: str) -> Path | None:
    """One panel per key that appears in the metrics; None when none of them does."""
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

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (key, pts) in zip(axes[0], series.items(), strict=True):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
