"""Slide-level metrics: balanced accuracy (the competition's metric), per-class recall, confusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix


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
