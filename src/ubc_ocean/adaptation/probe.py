"""A kNN probe of tile embeddings: how often a tile's nearest neighbours (cosine) vote for its class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_accuracy(features: torch.Tensor, labels: np.ndarray, groups: np.ndarray | None = None, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote (cosine similarity) of ``labels``; with ``groups``
    (e.g. each tile's slide), neighbours of the tile's own group are left out too (a tile would otherwise find
    its own slide's tiles)."""
    z = F.normalize(features.detach().float().cpu(), dim=1)
    similarity = z @ z.T
    similarity.fill_diagonal_(-torch.inf)
    if groups is not None:
        similarity[torch.from_numpy(np.asarray(groups)[:, None] == np.asarray(groups)[None, :])] = -torch.inf
    neighbours = similarity.topk(k, dim=1).indices.numpy()
    names, codes = np.unique(np.asarray(labels), return_inverse=True)
    predicted = np.array([np.bincount(row, minlength=len(names)).argmax() for row in codes[neighbours]])
    return float((predicted == codes).mean())
