"""Bootstrap statistics of one configuration's test predictions, and paired differences between two.

Every configuration is scored on the same resamples of the test images (:func:`ubc_ocean.metrics.bootstrap_counts`
over the images in one fixed order), so a difference between two configurations is computed resample by
resample: the paired bootstrap. Intervals are central percentile intervals of the draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ubc_ocean.metrics import balanced_accuracy_draws, percentile_interval, proportion_draws

# The metrics of one configuration on the test images: name -> what it measures.
METRICS = {
    "test_ba": "balanced accuracy over every test image (Other is one of the classes)",
    "wsi_ba": "balanced accuracy over the WSIs",
    "tma_ba": "balanced accuracy over the TMAs",
    "other_recall": "share of the Other images labelled Other",
    "other_recall_wsi": "share of the Other WSIs labelled Other",
    "other_recall_tma": "share of the Other TMAs labelled Other",
    "flag_rate": "share of the in-distribution images labelled Other",
    "flag_rate_wsi": "share of the in-distribution WSIs labelled Other",
    "flag_rate_tma": "share of the in-distribution TMAs labelled Other",
}


@dataclass(frozen=True)
class Estimate:
    """A value and its bootstrap interval."""

    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        """``0.712 [0.650, 0.770]`` (``n/a`` when there is no value)."""
        if not np.isfinite(self.value):
            return "n/a"
        interval = f" [{self.low:.{digits}f}, {self.high:.{digits}f}]" if np.isfinite(self.low) else ""
        return f"{self.value:.{digits}f}{interval}"


def metric_draws(scored: pd.DataFrame, outlier: str, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric of :data:`METRICS` on each resample (row of ``counts``, over ``scored``'s rows). The
    balanced accuracies average the classes present in the test labels (as the competition does)."""
    truth, pred = scored["label"].to_numpy(dtype=object), scored["predicted"].to_numpy(dtype=object)
    tma = scored["is_tma"].to_numpy(dtype=bool)
    labels = sorted(set(truth))
    other, said_other = truth == outlier, pred == outlier
    out = {
        "test_ba": balanced_accuracy_draws(truth, pred, labels, counts),
        "wsi_ba": balanced_accuracy_draws(truth, pred, labels, counts, ~tma),
        "tma_ba": balanced_accuracy_draws(truth, pred, labels, counts, tma),
    }
    for suffix, keep in (("", np.ones_like(tma)), ("_wsi", ~tma), ("_tma", tma)):
        out[f"other_recall{suffix}"] = proportion_draws(said_other, other & keep, counts)
        out[f"flag_rate{suffix}"] = proportion_draws(said_other, ~other & keep, counts)
    return out


@dataclass(frozen=True)
class Bootstrapped:
    """One configuration's metrics on the test images (``values``) and on each resample (``draws``), computed
    once; the images they refer to (``image_ids``, ``labels``) make sure two are paired only when they match."""

    values: dict[str, float]
    draws: dict[str, np.ndarray]
    image_ids: tuple[str, ...]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, scored: pd.DataFrame, outlier: str, counts: np.ndarray) -> Bootstrapped:
        """``scored`` (:func:`ubc_ocean.submit.score.scored_frame`) on the test images and on the resamples
        ``counts``."""
        if counts.shape[1] != len(scored):
            raise ValueError(f"resamples of {counts.shape[1]} images for {len(scored)} scored test images")
        ones = np.ones((1, len(scored)), dtype=np.int64)
        values = {name: float(value[0]) for name, value in metric_draws(scored, outlier, ones).items()}
        return cls(values, metric_draws(scored, outlier, counts), tuple(scored["image_id"]), tuple(scored["label"]))

    def estimate(self, metric: str, level: float = 0.95) -> Estimate:
        return Estimate(self.values[metric], *percentile_interval(self.draws[metric], level))

    def minus(self, reference: Bootstrapped, metric: str, level: float = 0.95) -> Estimate:
        """This configuration's ``metric`` minus ``reference``'s, resample by resample (paired): identical
        predictions give exactly 0."""
        if (self.image_ids, self.labels) != (reference.image_ids, reference.labels):
            raise ValueError("paired difference: the two configurations were scored on different test images")
        draws = self.draws[metric] - reference.draws[metric]
        return Estimate(self.values[metric] - reference.values[metric], *percentile_interval(draws, level))


def summarise(scored: pd.DataFrame, outlier: str, counts: np.ndarray, level: float = 0.95) -> dict[str, Estimate]:
    """Each metric's value on the test images and its ``level`` bootstrap interval over ``counts``."""
    scores = Bootstrapped.of(scored, outlier, counts)
    return {name: scores.estimate(name, level) for name in METRICS}


def paired_difference(scored: pd.DataFrame, reference: pd.DataFrame, outlier: str, counts: np.ndarray,
                      metric: str = "test_ba", level: float = 0.95) -> Estimate:
    """``metric`` of ``scored`` minus that of ``reference`` on the same test images, with the interval of the
    difference over the same resamples (``counts``) for both: identical predictions give exactly 0."""
    if list(scored["image_id"]) != list(reference["image_id"]):
        raise ValueError("paired difference: the two configurations were scored on different test images")
    return Bootstrapped.of(scored, outlier, counts).minus(Bootstrapped.of(reference, outlier, counts), metric, level)


def choose_best(oof: Mapping[str, float], order: Sequence[str]) -> str | None:
    """The configuration with the highest OOF balanced accuracy (the first listed on a tie; NaN never wins):
    the choice is made on OOF only, as on Kaggle, never on the benchmark's test split."""
    finite = [name for name in order if name in oof and np.isfinite(oof[name])]
    return max(finite, key=lambda name: oof[name]) if finite else None


def site_predictability(features: np.ndarray, is_test: np.ndarray, is_tma: np.ndarray, folds: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """How well the slides' features tell the training hospitals from the unseen test ones: the ROC AUC of a
    ``folds``-fold cross-validated logistic regression (standardised features) predicting ``is_test`` from
    each slide's mean embedding, over all slides and over the WSIs and the TMAs apart (from the same
    out-of-fold scores). 0.5: no trace of the site; 1: every slide's site is plain. NaN where a group lacks
    one of the two sites."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, tma = np.asarray(features, float), np.asarray(is_test, bool), np.asarray(is_tma, bool)
    nan = {"all": float("nan"), "wsi": float("nan"), "tma": float("nan")}
    splits = min(int(folds), int(y.sum()), int((~y).sum()))
    if splits < 2:
        return nan
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_predict(model, x, y, cv=StratifiedKFold(splits, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]

    def auc(where: np.ndarray) -> float:
        return float(roc_auc_score(y[where], scores[where])) if len(set(y[where])) == 2 else float("nan")

    return {"all": auc(np.ones_like(y)), "wsi": auc(~tma), "tma": auc(tma)}
