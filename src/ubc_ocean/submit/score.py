"""Score a submission against known labels (the synthetic demo's hidden file; never an input of a stage)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ubc_ocean.metrics import balanced_accuracy, per_class_recall


def scored_frame(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``image_id, label, predicted, is_tma`` for every labelled image, sorted by ``image_id`` (the fixed order
    the benchmark's bootstrap resamples refer to). ``predictions``: ``image_id, label``; ``truth``: ``image_id,
    label`` and ``is_tma``, carried when present. An image without a prediction is an error naming it (a
    submission lists every test image)."""
    truth = truth.assign(image_id=truth["image_id"].astype(str))
    predictions = predictions.assign(image_id=predictions["image_id"].astype(str))
    columns = [c for c in ("image_id", "label", "is_tma") if c in truth.columns]
    merged = truth[columns].merge(
        predictions[["image_id", "label"]].rename(columns={"label": "predicted"}), on="image_id", how="left")
    missing = merged.loc[merged["predicted"].isna(), "image_id"].tolist()
    if missing:
        raise ValueError(f"{len(missing)} labelled test images have no prediction, e.g. {missing[:5]}")
    if "is_tma" in merged:
        merged["is_tma"] = merged["is_tma"].astype(bool)
    return merged.sort_values("image_id", kind="stable").reset_index(drop=True)


def score_submission(submission_csv: str | Path, labels_csv: str | Path) -> dict:
    """Balanced accuracy (mean recall over the true classes, Other included) and per-class recall."""
    scored = scored_frame(pd.read_csv(submission_csv, dtype={"image_id": str}),
                          pd.read_csv(labels_csv, dtype={"image_id": str}))
    classes = sorted(scored["label"].unique())
    return {
        "balanced_accuracy": balanced_accuracy(scored["label"], scored["predicted"], classes),
        "per_class_recall": per_class_recall(scored["label"], scored["predicted"], classes),
        "n_images": len(scored),
    }
