"""Outlier scores for slides: higher means more likely an outlier ("Other").

From the classifier's outputs: ``max_prob`` (1 - max softmax probability), ``entropy`` (normalised
predictive entropy), ``energy`` (-logsumexp of the logits, Liu et al. 2020); from the bag embedding:
``mahalanobis`` and ``knn`` (see :mod:`ubc_ocean.outliers.feature_space`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp

from ubc_ocean.outliers.feature_space import FeatureSpaceDetector

SCORE_NAMES = ("max_prob", "entropy", "energy", "mahalanobis", "knn")
PROBABILITY_SCORES = ("max_prob", "entropy")


def max_prob_score(probs: np.ndarray) -> np.ndarray:
    """1 - max softmax probability (Hendrycks & Gimpel)."""
    return 1.0 - probs.max(axis=1)


def entropy_score(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of the predicted distribution, normalised to [0, 1] by log(C)."""
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1) / np.log(probs.shape[1])


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Free energy -logsumexp(logits): low for confident known-class slides."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


_FROM_PROBS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"max_prob": max_prob_score, "entropy": entropy_score}


def outlier_scores(probs: np.ndarray, name: str) -> np.ndarray:
    """A probability-based score (``max_prob`` or ``entropy``) of each row of ``probs`` [N, C]."""
    if name not in _FROM_PROBS:
        raise ValueError(f"unknown probability score {name!r}; known: {sorted(_FROM_PROBS)}")
    return _FROM_PROBS[name](np.asarray(probs, dtype=np.float64))


def score_table(
    probs: np.ndarray,
    logits: np.ndarray,
    embeddings: np.ndarray | None = None,
    detector: FeatureSpaceDetector | None = None,
) -> dict[str, np.ndarray]:
    """Every score that the inputs allow (feature-space scores need the embeddings and a fitted detector)."""
    table = {name: outlier_scores(probs, name) for name in PROBABILITY_SCORES}
    table["energy"] = energy_score(logits)
    if detector is not None and embeddings is not None:
        table.update(detector.scores(embeddings))
    return table


def check_score_name(name: str) -> str:
    if name not in SCORE_NAMES:
        raise ValueError(f"unknown outlier score {name!r}; one of {SCORE_NAMES}")
    return name
