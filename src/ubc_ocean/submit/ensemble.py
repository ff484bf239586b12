"""Ensembling models' predictions: weights, a weighted mean over the union of their ids, the "Other"
score of an ensemble and the final labels."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ubc_ocean.outliers import PROBABILITY_SCORES, outlier_scores

log = logging.getLogger(__name__)


def ensemble_weights(oof_scores: Mapping[str, float], mode: str) -> dict[str, float]:
    """``equal`` or ``oof`` (proportional to each model's OOF balanced accuracy); weights sum to 1."""
    if mode == "equal":
        raw = {name: 1.0 for name in oof_scores}
    elif mode == "oof":
        raw = {name: max(score, 1e-6) for name, score in oof_scores.items()}
    else:
        raise ValueError(f"unknown submit.weighting {mode!r} (equal | oof)")
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def weighted_mean(frames: Mapping[str, pd.DataFrame], weights: Mapping[str, float], key: str,
                  columns: Sequence[str]) -> pd.DataFrame:
    """Weighted mean of ``columns`` over tables keyed by ``key``, on the union of their keys: each row
    averages the models that predicted it, their weights renormalised (a row no model predicted in full
    stays NaN). Other columns come from the first table holding the row."""
    columns = list(columns)
    tables = [(name, frame.set_index(key)) for name, frame in frames.items()]
    index = pd.Index(sorted(set().union(*(table.index for _, table in tables))), name=key)
    total = pd.DataFrame(0.0, index=index, columns=columns)
    weight = pd.Series(0.0, index=index)
    rest = None
    for name, table in tables:
        values = table[columns].reindex(index).astype(float)
        present = values.notna().all(axis=1)
        total = total + values.where(present, 0.0).mul(weights[name])
        weight = weight + present * weights[name]
        others = table.drop(columns=columns)
        rest = others if rest is None else rest.combine_first(others)
    if (weight < 1.0 - 1e-9).any():
        log.warning("%d of %d %s rows lack some model's prediction: averaged over the models that have them",
                    int((weight < 1.0 - 1e-9).sum()), len(index), key)
    mean = total.div(weight.where(weight > 0), axis=0)
    return pd.concat([rest.reindex(index), mean], axis=1).reset_index()


def ensemble_scores(frame: pd.DataFrame, classes: Sequence[str], score: str) -> np.ndarray:
    """The outlier score of ensembled rows: recomputed from the mean probabilities for ``max_prob`` and
    ``entropy``; the models' weighted mean ``score_*`` column otherwise."""
    if score in PROBABILITY_SCORES:
        return outlier_scores(frame[list(classes)].to_numpy(), score)
    return frame[f"score_{score}"].to_numpy()


def label_predictions(probs: np.ndarray, flagged: np.ndarray, classes: Sequence[str], outlier: str) -> np.ndarray:
    labels = np.asarray(classes, dtype=object)[probs.argmax(1)]
    labels[flagged] = outlier
    return labels
