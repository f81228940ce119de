"""history.csv (one row per completed epoch, rewritten atomically) and curves.png drawn from it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import atomic_write_bytes, atomic_write_text


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    out[k] = int(v) if k == "epoch" else float(v)
                except (TypeError, ValueError):
                    out[k] = v
            rows.append(out)
    return rows


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite history.csv atomically (earlier rows kept as they were: an append that cannot tear)."""
    keys: list[str] = ["epoch"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """curves.png: loss, AUC and F1 per epoch, train and validation (matplotlib Agg, no pyplot state)."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in rows]
    for i, (key, title) in enumerate([("loss", "loss"), ("auc", "AUC"), ("f1", "micro F1 at 0.5")]):
        ax = fig.add_subplot(1, 3, i + 1)
        for prefix, style in (("", "-o"), ("val_", "-s")):
            ys = [r.get(prefix + key) for r in rows]
            if any(isinstance(y, float) and math.isfinite(y) for y in ys):
                ax.plot(epochs, [y if isinstance(y, float) else np.nan for y in ys], style, markersize=3,
                        label="train" if not prefix else "val")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
