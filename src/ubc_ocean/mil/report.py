"""What a trained model's OOF predictions say: metrics JSON, confusion matrix CSV and PNG."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean.io_utils import atomic_write_csv, atomic_write_text
from ubc_ocean.metrics import confusion_frame, oof_metrics, seed_mean

__all__ = ["oof_metrics", "plot_confusion", "seed_mean", "write_report"]


def write_report(per_slide: pd.DataFrame, classes: Sequence[str], out_dir: Path, title: str,
                 notes: Mapping | None = None) -> dict:
    """metrics.json (the metrics plus ``notes``), confusion.csv and confusion.png in ``out_dir``; returns
    the metrics."""
    metrics = {**oof_metrics(per_slide, classes), **(notes or {})}
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    predicted = np.asarray(classes)[per_slide[list(classes)].to_numpy().argmax(1)]
    confusion = confusion_frame(per_slide["label"], predicted, classes)
    atomic_write_csv(confusion.reset_index(), out_dir / "confusion.csv")
    plot_confusion(confusion, out_dir / "confusion.png", f"{title}: OOF BA {metrics['balanced_accuracy']:.3f}")
    return metrics


def plot_confusion(confusion: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ubc_ocean.charts import draw_confusion

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    draw_confusion(ax, confusion, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
