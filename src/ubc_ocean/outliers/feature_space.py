"""Feature-space outlier scores on bag embeddings: Mahalanobis distance to the class means (shared,
shrunk covariance; Lee et al. 2018) and distance to the k-th nearest training bag (Sun et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class FeatureSpaceDetector:
    """Fitted on the training bags' embeddings of one model; scores are larger for outliers."""

    means: np.ndarray      # [C, E] class means (NaN rows for classes absent from training)
    precision: np.ndarray  # [E, E] inverse of the shared Ledoit-Wolf covariance
    bank: np.ndarray       # [N, E] L2-normalised training embeddings
    k: int

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: Sequence[int], n_classes: int, k: int = 5) -> FeatureSpaceDetector:
        from sklearn.covariance import LedoitWolf  # here, not at the top: stage 05 only loads fitted detectors

        x = np.asarray(embeddings, dtype=np.float64)
        y = np.asarray(labels)
        means = np.full((n_classes, x.shape[1]), np.nan)
        centred = []
        for label in range(n_classes):
            members = x[y == label]
            if len(members):
                means[label] = members.mean(axis=0)
                centred.append(members - means[label])
        covariance = LedoitWolf().fit(np.concatenate(centred)).covariance_
        return cls(means, np.linalg.pinv(covariance), _normalise(x), int(k))

    def mahalanobis(self, embeddings: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to any known class mean."""
        x = np.asarray(embeddings, dtype=np.float64)
        known = self.means[~np.isnan(self.means).any(axis=1)]
        diff = x[:, None, :] - known[None, :, :]
        distances = np.einsum("nce,nce->nc", diff @ self.precision, diff)  # one GEMM, not an E^2 loop per pair
        return distances.min(axis=1)

    def knn(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine distance to the k-th nearest training bag (k capped by the bank size)."""
        similarity = _normalise(np.asarray(embeddings, dtype=np.float64)) @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return 1.0 - kth

    def scores(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        return {"mahalanobis": self.mahalanobis(embeddings), "knn": self.knn(embeddings)}

    def to_dict(self) -> dict:
        return {"means": self.means, "precision": self.precision, "bank": self.bank, "k": self.k}

    @classmethod
    def from_dict(cls, data: Mapping) -> FeatureSpaceDetector:
        return cls(np.asarray(data["means"]), np.asarray(data["precision"]), np.asarray(data["bank"]), int(data["k"]))
