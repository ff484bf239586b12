"""What a trained model's OOF predictions say: metrics JSON, confusion matrix CSV and PNG."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean.io_utils import atomic_write_csv, atomic_write_text
from ubc_ocean.metrics import balanced_accuracy, chance_balanced_accuracy, confusion_frame, per_class_recall


def seed_mean(oof: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per slide: class probabilities (and ``score_*`` columns) averaged over seeds."""
    keys = ["slide_id", "image_id", "label", "is_tma", "fold"]
    values = list(classes) + [c for c in oof.columns if c.startswith("score_")]
    return oof.groupby(keys, as_index=False, sort=True)[values].mean()


def oof_metrics(per_slide: pd.DataFrame, classes: Sequence[str]) -> dict:
    """Balanced accuracy overall and for WSIs and TMAs apart, per-class recall, and whether the model
    learned: ``learned`` is false when the balanced accuracy is not above ``chance_balanced_accuracy_p99``,
    what 99% of label shufflings stay below (see :func:`ubc_ocean.metrics.chance_balanced_accuracy`)."""
    predicted = np.asarray(classes)[per_slide[list(classes)].to_numpy().argmax(1)]
    truth = per_slide["label"].to_numpy()
    tma = per_slide["is_tma"].astype(bool).to_numpy()

    def subset(mask: np.ndarray) -> float | None:
        return balanced_accuracy(truth[mask], predicted[mask], classes) if mask.any() else None

    score = balanced_accuracy(truth, predicted, classes)
    chance, upper = chance_balanced_accuracy(truth, predicted)
    return {
        "n_slides": len(per_slide),
        "balanced_accuracy": score,
        "chance_balanced_accuracy": chance,
        "chance_balanced_accuracy_p99": upper,
        "learned": bool(score > upper),
        "balanced_accuracy_wsi": subset(~tma),
        "balanced_accuracy_tma": subset(tma),
        "per_class_recall": per_class_recall(truth, predicted, classes),
    }


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

    from ubc_ocean.viz.cv import draw_confusion

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    draw_confusion(ax, confusion, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
