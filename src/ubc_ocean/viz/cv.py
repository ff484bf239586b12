"""Cross-validation figures of one model from its per-slide OOF table (``mil.report.seed_mean``): balanced
accuracy with a bootstrap interval, confusion matrix, per-class recall, WSI against TMA, a reliability
diagram, the outlier score's distribution with its threshold, and leave-one-class-out ROC curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ubc_ocean.charts import draw_confusion, draw_histogram
from ubc_ocean.metrics import (
    balanced_accuracy,
    balanced_accuracy_draws,
    bootstrap_counts,
    confusion_frame,
    per_class_recall,
    percentile_interval,
)


def predicted_labels(per_slide: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The argmax class of each slide's probability columns."""
    return np.asarray(classes)[per_slide[list(classes)].to_numpy().argmax(1)]


def bootstrap_interval(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str],
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy (slides resampled with replacement; a
    resample's BA averages the recalls of the classes it holds)."""
    counts = bootstrap_counts(len(truth), n_boot, seed)
    return percentile_interval(balanced_accuracy_draws(truth, predicted, classes, counts), level)


def model_summary(per_slide: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000) -> dict:
    """Balanced accuracy (with its 95% bootstrap interval), and apart for WSIs and TMAs."""
    truth, predicted = per_slide["label"].to_numpy(), predicted_labels(per_slide, classes)
    tma = per_slide["is_tma"].astype(bool).to_numpy()
    low, high = bootstrap_interval(truth, predicted, classes, n_boot)

    def subset(mask: np.ndarray) -> float:
        return balanced_accuracy(truth[mask], predicted[mask], classes) if mask.any() else float("nan")

    return {"slides": len(per_slide), "balanced_accuracy": balanced_accuracy(truth, predicted, classes),
            "ci_low": low, "ci_high": high, "wsi": subset(~tma), "tma": subset(tma)}


def reliability(per_slide: pd.DataFrame, classes: Sequence[str], bins: int = 10) -> pd.DataFrame:
    """Per confidence bin (top-class probability): slides, mean confidence, accuracy."""
    probs = per_slide[list(classes)].to_numpy()
    confidence = probs.max(1)
    correct = predicted_labels(per_slide, classes) == per_slide["label"].to_numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "confidence": confidence, "correct": correct})
    table = frame.groupby("bin").agg(slides=("correct", "size"), confidence=("confidence", "mean"),
                                     accuracy=("correct", "mean"))
    return table.reindex(range(bins)).assign(low=edges[:-1], high=edges[1:])


def draw_loco_roc(ax, scores: pd.DataFrame, score: str) -> None:  # type: ignore[no-untyped-def]
    """One ROC curve per held-out class for ``score`` (rows of ``mil.loco`` per-slide scores of one model)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    for held_out, group in scores[scores["score"] == score].groupby("held_out"):
        fpr, tpr, _ = roc_curve(group["unknown"], group["value"])
        ax.plot(fpr, tpr, label=f"{held_out} ({roc_auc_score(group['unknown'], group['value']):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"leave-one-class-out ROC ({score})", fontsize=10)
    ax.legend(fontsize=7, title="held out", title_fontsize=7)


def cv_figure(name: str, per_slide: pd.DataFrame, classes: Sequence[str], score: str,
              threshold: float | None, loco: pd.DataFrame | None = None, test_scores: np.ndarray | None = None):
    """One model's cross-validation panels as a matplotlib figure (the ROC panel only with ``loco``)."""
    import matplotlib.pyplot as plt

    summary = model_summary(per_slide, classes)
    predicted = predicted_labels(per_slide, classes)
    panels = 6 if loco is not None and len(loco) else 5
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.0))
    draw_confusion(axes[0], confusion_frame(per_slide["label"], predicted, classes),
                   f"{name}: BA {summary['balanced_accuracy']:.3f} "
                   f"[{summary['ci_low']:.2f}, {summary['ci_high']:.2f}]")
    recall = per_class_recall(per_slide["label"], predicted, classes)
    axes[1].bar(list(recall), [0 if np.isnan(v) else v for v in recall.values()], color="tab:green")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("per-class recall", fontsize=10)
    axes[2].bar(["all", "WSI", "TMA"], [np.nan_to_num(summary[k]) for k in ("balanced_accuracy", "wsi", "tma")],
                color=["tab:blue", "tab:purple", "tab:orange"])
    axes[2].set_ylim(0, 1)
    axes[2].set_title("balanced accuracy, WSI against TMA", fontsize=10)
    table = reliability(per_slide, classes)
    axes[3].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[3].bar(table["low"], table["accuracy"].fillna(0), width=table["high"] - table["low"], align="edge",
                alpha=0.6, edgecolor="black", label="accuracy")
    axes[3].plot(table["confidence"], table["accuracy"], "o-", color="firebrick", label="per bin")
    axes[3].set_xlabel("confidence (top-class probability)")
    axes[3].set_ylabel("accuracy")
    axes[3].set_title("reliability diagram", fontsize=10)
    series = {"OOF (known classes)": per_slide[f"score_{score}"].to_numpy()}
    if test_scores is not None and len(test_scores):
        series["test"] = np.asarray(test_scores)
    draw_histogram(axes[4], series, score, threshold, "threshold")
    axes[4].set_title(f"outlier score {score}", fontsize=10)
    if panels == 6:
        draw_loco_roc(axes[5], loco, score)
    fig.tight_layout()
    return fig
