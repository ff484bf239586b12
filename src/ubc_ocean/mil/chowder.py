"""Chowder, after Courtiol et al. 2018 ("Classification and disease localization in histopathology using
only global labels"); a Chowder-style head won UBC-OCEAN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


def _count(label: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {value!r}")
    return value


def extreme_scores(scores: torch.Tensor, n_top: int, n_bottom: int) -> torch.Tensor:
    """Per channel, the ``n_top`` highest (descending) then the ``n_bottom`` lowest (ascending) of ``scores``
    [N, C] -> [C, n_top + n_bottom].

    A bag with fewer than ``n_top`` (or ``n_bottom``) instances repeats its last extreme value (the
    smallest of the top ones, the largest of the bottom ones) to fill the remaining slots.
    """
    n = scores.shape[0]

    def take(largest: bool, k: int) -> torch.Tensor:
        values = torch.topk(scores, min(k, n), dim=0, largest=largest, sorted=True).values  # [min(k, N), C]
        if values.shape[0] < k:
            values = torch.cat([values, values[-1:].expand(k - values.shape[0], -1)], dim=0)
        return values

    return torch.cat([take(True, n_top), take(False, n_bottom)], dim=0).T


@register("chowder")
class Chowder(MILModel):
    """Per-instance class scores from a linear layer (the paper's kernel-1 convolution; one score channel
    per class); for each channel the ``n_top`` highest and ``n_bottom`` lowest scores (the MinMax layer),
    concatenated over channels, feed an MLP (``Linear+Sigmoid+Dropout`` per hidden size) to the bag logits.

    ``embedding`` [1, C * (n_top + n_bottom)] is the concatenated extreme scores, ``instance_scores``
    [1, N, C] the per-instance scores. No ``attention``. Bags smaller than ``n_top`` / ``n_bottom`` repeat
    their last extreme score, so a single instance works. ``hidden_dims`` may be a tuple or a list (it is
    stored as a list so that the config survives YAML).
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
        _count("n_top", n_top, 1)
        _count("n_bottom", n_bottom, 0)
        if isinstance(hidden_dims, str | bytes) or not isinstance(hidden_dims, Sequence):
            raise ValueError(f"hidden_dims must be a list of positive ints, got {hidden_dims!r}")
        hidden = [_count("hidden_dims entry", d, 1) for d in hidden_dims]
        super().__init__(
            in_dim,
            n_classes,
            options={"n_top": n_top, "n_bottom": n_bottom, "hidden_dims": hidden, "dropout": dropout},
            embedding_dim=n_classes * (n_top + n_bottom),
        )
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
