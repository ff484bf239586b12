"""Nearest bags: which training slides look most like a given slide, by the cosine similarity of their
mean tile embeddings (the encoder's space, no model involved)."""

from __future__ import annotations

import numpy as np


def mean_embedding(features: np.ndarray) -> np.ndarray:
    """A bag's mean instance embedding [D] (float64)."""
    return np.asarray(features, dtype=np.float64).mean(axis=0)


def nearest(query: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``bank`` [M, D] most cosine-similar to each ``query`` row [Q, D]: ``(indices [Q, k],
    similarities [Q, k])``, most similar first."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(query) @ unit(bank).T
    k = min(k, similarity.shape[1])
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)
