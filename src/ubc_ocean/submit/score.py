"""Score a submission against known labels (the synthetic demo's hidden file; never an input of a stage)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ubc_ocean.metrics import balanced_accuracy, per_class_recall


def score_submission(submission_csv: str | Path, labels_csv: str | Path) -> dict:
    """Balanced accuracy (mean recall over the true classes, Other included) and per-class recall."""
    submission = pd.read_csv(submission_csv, dtype={"image_id": str})
    truth = pd.read_csv(labels_csv, dtype={"image_id": str})
    merged = truth.merge(submission, on="image_id", how="left", suffixes=("_true", "_pred"))
    if merged["label_pred"].isna().any():
        raise ValueError(f"submission lacks {int(merged['label_pred'].isna().sum())} labelled images")
    classes = sorted(merged["label_true"].unique())
    return {
        "balanced_accuracy": balanced_accuracy(merged["label_true"], merged["label_pred"], classes),
        "per_class_recall": per_class_recall(merged["label_true"], merged["label_pred"], classes),
        "n_images": len(merged),
    }
