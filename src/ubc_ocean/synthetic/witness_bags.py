"""A known-answer multiple-instance problem: bags of Gaussian instances in which a few witnesses carry
their class's direction.

Each class ``c`` owns a unit direction ``d_c`` (the directions are orthonormal). A bag of class ``c``
holds ``N`` instances drawn from ``N(0, I)``; ``max(min_witnesses, round(witness_rate * N))`` of them
are shifted by ``strength * d_c``. Everything else is noise, so the label lives in a few percent of the
instances: attention or extreme-score pooling should find them, mean pooling dilutes them by ``1/N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class WitnessProblem:
    """The problem's constants; ``direction_seed`` fixes the class directions shared by every split."""

    n_classes: int = 5
    dim: int = 32
    min_bag: int = 40
    max_bag: int = 300
    witness_rate: float = 0.03
    min_witnesses: int = 2
    strength: float = 5.0
    direction_seed: int = 7

    def __post_init__(self) -> None:
        if not 2 <= self.n_classes <= self.dim:
            raise ValueError(f"need 2 <= n_classes <= dim for orthonormal directions, got {self.n_classes}, {self.dim}")
        if not 1 <= self.min_bag <= self.max_bag:
            raise ValueError(f"need 1 <= min_bag <= max_bag, got {self.min_bag}, {self.max_bag}")
        if not 1 <= self.min_witnesses <= self.min_bag:
            raise ValueError(f"need 1 <= min_witnesses <= min_bag, got {self.min_witnesses}")

    def directions(self) -> np.ndarray:
        """``[n_classes, dim]`` orthonormal class directions."""
        basis = np.linalg.qr(np.random.default_rng(self.direction_seed).normal(size=(self.dim, self.n_classes)))[0]
        return basis.T


@dataclass
class WitnessBags:
    """One split: ``bags[i]`` is ``[N_i, dim]`` (float16, like cached embeddings), ``labels[i]`` its class
    and ``witnesses[i]`` the boolean mask of its shifted instances."""

    bags: list[torch.Tensor]
    labels: list[int]
    witnesses: list[np.ndarray]


def witness_bags(problem: WitnessProblem, bags_per_class: int, seed: int) -> WitnessBags:
    """``bags_per_class`` bags of every class, in a seeded random order."""
    directions = problem.directions()
    rng = np.random.default_rng(seed)
    bags, labels, witnesses = [], [], []
    for label in range(problem.n_classes):
        for _ in range(bags_per_class):
            n = int(rng.integers(problem.min_bag, problem.max_bag + 1))
            instances = rng.normal(size=(n, problem.dim))
            mask = np.zeros(n, dtype=bool)
            mask[rng.choice(n, max(problem.min_witnesses, round(problem.witness_rate * n)), replace=False)] = True
            instances[mask] += problem.strength * directions[label]
            bags.append(torch.tensor(instances, dtype=torch.float16))
            labels.append(label)
            witnesses.append(mask)
    order = rng.permutation(len(bags))
    return WitnessBags([bags[i] for i in order], [labels[i] for i in order], [witnesses[i] for i in order])
