"""Charts drawn from arrays and tables, with no artefact of any stage: image grids per class, histograms with
their thresholds and confusion matrices (stage 04's report and :mod:`ubc_ocean.viz` both draw with them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


def image_grid(images: Mapping[str, Sequence[tuple[str, np.ndarray]]], size: float = 1.8):
    """One row per key (a class), its images left to right, each titled with its name; a matplotlib
    figure."""
    import matplotlib.pyplot as plt

    rows = max(1, len(images))
    cols = max([1, *(len(row) for row in images.values())])
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.8, size * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (key, pictures) in enumerate(images.items()):
        axes[row, 0].text(-0.1, 0.5, key, transform=axes[row, 0].transAxes, ha="right", va="center",
                          fontsize=10, fontweight="bold")
        for col, (name, rgb) in enumerate(pictures):
            axes[row, col].imshow(rgb)
            axes[row, col].set_title(name, fontsize=7)
    fig.tight_layout()
    return fig


def draw_histogram(ax, series: Mapping[str, np.ndarray], xlabel: str,  # type: ignore[no-untyped-def]
                   threshold: float | None = None, threshold_label: str = "threshold", bins: int = 20) -> None:
    """Overlaid histograms of ``series`` (label -> values, non-finite values left out) on shared bins, and
    ``threshold`` as a dashed vertical line when given and finite."""
    finite = {label: np.asarray(v, dtype=float)[np.isfinite(np.asarray(v, dtype=float))] for label, v in series.items()}
    pooled = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
    edges = np.histogram_bin_edges(pooled, bins=bins)
    for label, values in finite.items():
        ax.hist(values, bins=edges, alpha=0.6, label=f"{label} ({len(values)})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="firebrick", linestyle="--", label=f"{threshold_label} {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=7)


def draw_confusion(ax, confusion: pd.DataFrame, title: str) -> None:  # type: ignore[no-untyped-def]
    """A confusion matrix (rows true, columns predicted) with its counts written in."""
    ax.imshow(confusion.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(confusion.columns)), confusion.columns)
    ax.set_yticks(range(len(confusion.index)), confusion.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    counts = confusion.to_numpy()
    for (row, col), value in np.ndenumerate(counts):  # white on the dark cells
        ax.text(col, row, str(value), ha="center", va="center", fontsize=9,
                color="white" if value > counts.max() / 2 else "black")
    ax.set_title(title, fontsize=10)
