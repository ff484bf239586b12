"""Slide-level metrics: balanced accuracy (the competition's metric), per-class recall, confusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (as the competition scores it)."""
    recalls = per_class_recall(y_true, y_pred, labels)
    values = [v for v in recalls.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def per_class_recall(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Recall of each class (NaN for a class absent from ``y_true``)."""
    truth, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    classes = list(labels) if labels is not None else sorted(set(truth))
    out = {}
    for label in classes:
        hits = truth == label
        out[label] = float(np.mean(pred[hits] == label)) if hits.any() else float("nan")
    return out


def confusion_frame(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    """Rows: true class; columns: predicted class."""
    from sklearn.metrics import confusion_matrix  # here: importing scikit-learn costs each stage process a second

    matrix = confusion_matrix(list(y_true), list(y_pred), labels=list(labels))
    return pd.DataFrame(matrix, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted"))


def chance_balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str], quantile: float = 0.99,
                             permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """What balanced accuracy these predictions reach by chance: ``(expected, upper)``, where ``expected``
    is ``1 / n_classes`` (classes present in ``y_true``) and ``upper`` the ``quantile`` of the balanced
    accuracies of the same predictions against shuffled labels (a permutation test: a model whose score is
    not above ``upper`` has not shown, at level ``1 - quantile``, that it learned anything)."""
    classes, truth = np.unique(np.asarray(y_true, dtype=object).astype(str), return_inverse=True)
    pred = np.asarray(y_pred, dtype=object).astype(str)
    index = {label: i for i, label in enumerate(classes)}
    predicted = np.array([index.get(label, -1) for label in pred])
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(truth) for _ in range(permutations)])  # [P, n]
    hits = shuffled == predicted[None, :]
    counts = np.bincount(truth, minlength=len(classes))
    recall = np.stack([(hits & (shuffled == c)).sum(1) / counts[c] for c in range(len(classes))], 1)
    return 1.0 / len(classes), float(np.quantile(recall.mean(1), quantile))


# ------------------------------------------------------------------------------------------- bootstrap


def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]``: how often each of ``n`` items is drawn in each of ``n_boot`` resamples of ``n`` draws
    with replacement (seeded). Scoring two sets of predictions with the same counts pairs them."""
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def proportion_draws(event: np.ndarray, among: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample (row of ``counts``), the share of the drawn items in ``among`` for which ``event`` holds;
    NaN where a resample drew none of ``among``."""
    among = np.asarray(among, dtype=bool)
    total = counts @ among.astype(np.int64)
    hits = counts @ (among & np.asarray(event, dtype=bool)).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def balanced_accuracy_draws(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str],
                            counts: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Balanced accuracy of each resample (row of ``counts``, :func:`bootstrap_counts`), over the items in
    ``mask`` (all by default): the mean recall of the ``labels`` the resample holds, as
    :func:`balanced_accuracy` scores one set (``counts`` of one row of ones gives exactly that). NaN where a
    resample holds none of them."""
    truth, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    keep = np.ones(len(truth), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    recalls = np.stack([proportion_draws(pred == label, keep & (truth == label), counts) for label in labels])
    present = np.isfinite(recalls)
    n_present = present.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_present > 0, np.where(present, recalls, 0.0).sum(0) / np.maximum(n_present, 1), np.nan)


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` percentile interval of bootstrap draws (NaN draws left out; all NaN: ``(nan, nan)``)."""
    finite = np.asarray(draws, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


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
