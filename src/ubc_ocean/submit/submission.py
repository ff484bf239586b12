"""From models' predictions to a complete submission: the ensemble calibrated on OOF predictions, its labels
for test predictions, and a table that lists every test id once.

Shared by stage 06 (the final submission) and stage 05 (the provisional one it rewrites as predictions
arrive, so that a run stopped by its time limit still leaves a complete file). An id without a prediction
(its image failed, or the time budget ran out before it) is labelled :data:`FALLBACK_LABEL`'s value, the
outlier label (``data.outlier_label``, "Other"): with no evidence, every class is as likely as in the test
set at large, so no label is better in expectation for balanced accuracy, and "Other" keeps the rule one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean.io_utils import atomic_write_csv
from ubc_ocean.metrics import oof_metrics, seed_mean
from ubc_ocean.outliers import PROBABILITY_SCORES, OutlierThreshold, calibrate_from_config
from ubc_ocean.submit.ensemble import ensemble_scores, ensemble_weights, label_predictions, weighted_mean

log = logging.getLogger(__name__)
FALLBACK_LABEL = "data.outlier_label"  # the config key whose value labels an id without a prediction


@dataclass
class EnsembleCalibration:
    """The ensemble's weights and its "Other" threshold, both from OOF predictions only (never from test)."""

    classes: list[str]
    outlier: str
    score: str
    weights: dict[str, float]
    scores: dict[str, float]  # each model's OOF balanced accuracy
    threshold: OutlierThreshold
    metrics: dict  # the ensemble's OOF metrics
    flagging: dict = field(default_factory=dict)  # the threshold and the share of OOF slides it flags, per type

    @classmethod
    def from_oof(cls, oof: Mapping[str, pd.DataFrame], cfg: Mapping) -> EnsembleCalibration:
        """Calibrate on each model's OOF table (one row per slide and seed) as stage 04 wrote it."""
        classes, score = list(cfg["data"]["classes"]), str(cfg["outliers"]["score"])
        per_slide = {name: seed_mean(frame, classes) for name, frame in oof.items()}
        scores = {name: oof_metrics(frame, classes)["balanced_accuracy"] for name, frame in per_slide.items()}
        weights = ensemble_weights(scores, cfg["submit"]["weighting"])
        calibration = cls(classes, str(cfg["data"]["outlier_label"]), score, weights, scores,
                          OutlierThreshold(score, float("inf"), 0.0), {})
        ensemble = weighted_mean(per_slide, weights, "slide_id", calibration.columns)
        calibration.metrics = oof_metrics(ensemble, classes)
        values, is_tma = ensemble_scores(ensemble, classes, score), ensemble["is_tma"].to_numpy()
        calibration.threshold = calibrate_from_config(values, is_tma, cfg["outliers"])
        calibration.flagging = calibration.threshold.summary(values, is_tma)
        return calibration

    @property
    def columns(self) -> list[str]:
        """The columns averaged over models: the class probabilities, and the outlier score when it is not
        recomputed from them."""
        return [*self.classes, f"score_{self.score}"] if self.score not in PROBABILITY_SCORES else self.classes

    def labels(self, test: Mapping[str, pd.DataFrame], is_tma: Mapping[str, bool] | None = None) -> dict[str, str]:
        """``{image_id: label}`` for every id some model predicted; flagged or not fully predicted: Other.
        ``is_tma`` (``{image_id: bool}``) holds each image to its type's threshold when calibrated per type
        (an id it lacks gets the pooled threshold)."""
        frames = {name: frame for name, frame in test.items() if name in self.weights}
        if not any(len(frame) for frame in frames.values()):
            return {}
        ensemble = weighted_mean(frames, self.weights, "image_id", self.columns)
        unpredicted = ~np.isfinite(ensemble[self.classes].to_numpy()).all(axis=1)
        types = None if is_tma is None else ensemble["image_id"].astype(str).map(is_tma).to_numpy()
        flagged = self.threshold.flag(ensemble_scores(ensemble, self.classes, self.score), types) | unpredicted
        labels = label_predictions(ensemble[self.classes].to_numpy(), flagged, self.classes, self.outlier)
        return dict(zip(ensemble["image_id"].astype(str), labels, strict=True))


def complete_submission(test_ids: Sequence[str], labels: Mapping[str, str], fallback: str) -> pd.DataFrame:
    """``image_id, label`` for every test id once, in ``test.csv`` order; an id without a label gets
    ``fallback``."""
    ids = [str(i) for i in test_ids]
    return pd.DataFrame({"image_id": ids, "label": [labels.get(i, fallback) for i in ids]})


def write_submission(path: Path, test_ids: Sequence[str], labels: Mapping[str, str], fallback: str) -> pd.DataFrame:
    """Write :func:`complete_submission` atomically (a reader never sees half a file); returns it."""
    submission = complete_submission(test_ids, labels, fallback)
    atomic_write_csv(submission, path)
    return submission


class ProvisionalSubmission:
    """The submission as it stands while stage 05 predicts: complete at every write (every test id, those
    not predicted yet labelled by the fallback), rewritten at most every ``every_s`` seconds as
    predictions arrive, and once more by :meth:`write` with ``force``. Stage 06 replaces it at the end."""

    def __init__(self, path: Path, test_ids: Sequence[str], calibration: EnsembleCalibration,
                 is_tma: Mapping[str, bool] | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.test_ids, self.calibration = path, [str(i) for i in test_ids], calibration
        self.is_tma = is_tma
        self.every_s, self.clock = every_s, clock
        self.frames: dict[str, list[pd.DataFrame]] = {name: [] for name in calibration.weights}
        self._written = -float("inf")

    def add(self, predictions: Mapping[str, pd.DataFrame]) -> None:
        """New rows of each model's test predictions (``image_id`` and the prediction columns)."""
        for name, frame in predictions.items():
            self.frames[name].append(frame)
        self.write()

    def labels(self) -> dict[str, str]:
        """The ensemble's labels of the models predicted so far; a model with no prediction yet (one trained
        with CORAL waits for every image) is left out, the others' weights renormalised."""
        frames = {name: pd.concat(parts, ignore_index=True) for name, parts in self.frames.items() if parts}
        total = sum(self.calibration.weights[name] for name in frames)
        weights = {name: self.calibration.weights[name] / total for name in frames}
        return replace(self.calibration, weights=weights).labels(frames, self.is_tma) if frames else {}

    def write(self, force: bool = False) -> pd.DataFrame | None:
        """Rewrite the file when ``every_s`` has passed since the last write (or ``force``)."""
        if not force and self.clock() - self._written < self.every_s:
            return None
        self._written = self.clock()
        labels = self.labels()
        submission = write_submission(self.path, self.test_ids, labels, self.calibration.outlier)
        log.info("provisional submission: %d of %d test images predicted, the rest %s -> %s", len(labels),
                 len(self.test_ids), self.calibration.outlier, self.path)
        return submission
