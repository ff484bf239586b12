"""Chowder, after Courtiol et al. 2018 ("Classification and disease localization in histopathology using
only global labels"); a Chowder-style head won UBC-OCEAN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


def extreme_scores(scores: torch.Tensor, n_top: int, n_bottom: int) -> torch.Tensor:
    """Per channel, the ``n_top`` highest and ``n_bottom`` lowest of ``scores`` [N, C] -> [C, n_top + n_bottom].

    Bags smaller than ``n_top`` (or ``n_bottom``) repeat their last extreme value to fill the slots.
    """
    n = scores.shape[0]

    def take(largest: bool, k: int) -> torch.Tensor:
        values = torch.topk(scores, min(k, n), dim=0, largest=largest).values  # [min(k, N), C]
        if values.shape[0] < k:
            values = torch.cat([values, values[-1:].expand(k - values.shape[0], -1)], dim=0)
        return values

    return torch.cat([take(True, n_top), take(False, n_bottom)], dim=0).T


@register("chowder")
class Chowder(MILModel):
    """Per-instance class scores by a linear layer (the paper's kernel-1 convolution); for each class the
    ``n_top`` highest and ``n_bottom`` lowest scores, concatenated, feed an MLP giving the bag logits.

    ``embedding`` is the concatenated extreme scores; ``instance_scores`` [1, N, C] localise evidence.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        n_top: int = 5,
        n_bottom: int = 5,
        hidden_dims: Sequence[int] = (200, 100),
        dropout: float = 0.5,
    ) -> None:
        hidden = [int(d) for d in hidden_dims]
        super().__init__(
            in_dim,
            n_classes,
            options={"n_top": n_top, "n_bottom": n_bottom, "hidden_dims": hidden, "dropout": dropout},
            embedding_dim=n_classes * (n_top + n_bottom),
        )
        if n_top < 1 or n_bottom < 0:
            raise ValueError(f"need n_top >= 1 and n_bottom >= 0, got {n_top}, {n_bottom}")
        self.n_top, self.n_bottom = n_top, n_bottom
        self.instance_encoder = nn.Sequential(nn.Linear(in_dim, n_classes))
        layers: list[nn.Module] = []
        width = self.embedding_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Sigmoid(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.mlp = nn.Sequential(*layers)

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.instance_encoder(bag[0])  # [N, C]
        embedding = extreme_scores(scores, self.n_top, self.n_bottom).reshape(1, -1)
        return {"logits": self.mlp(embedding), "embedding": embedding, "instance_scores": scores.unsqueeze(0)}
