"""Uncertainty scores from class probabilities: higher means more likely an outlier."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def max_prob_score(probs: np.ndarray) -> np.ndarray:
    """1 - max softmax probability (Hendrycks & Gimpel)."""
    return 1.0 - probs.max(axis=1)


def entropy_score(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of the predicted distribution, normalised to [0, 1] by log(C)."""
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1) / np.log(probs.shape[1])


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": max_prob_score,
    "entropy": entropy_score,
}


def outlier_scores(probs: np.ndarray, name: str) -> np.ndarray:
    """Score each row of ``probs`` [N, C] with the named score."""
    if name not in SCORES:
        raise ValueError(f"unknown outlier score {name!r}; known: {sorted(SCORES)}")
    return SCORES[name](np.asarray(probs, dtype=np.float64))
