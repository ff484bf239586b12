"""Mean-pooling baseline: per-instance MLP, mean over the bag, MLP head."""

from __future__ import annotations

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


@register("meanpool")
class MeanPoolMIL(MILModel):
    """``Linear+ReLU+Dropout`` per instance, mean over instances (the ``embedding``), then
    ``Linear+ReLU+Dropout+Linear`` to the class logits. No attention output."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__(
            in_dim, n_classes, options={"hidden_dim": hidden_dim, "dropout": dropout}, embedding_dim=hidden_dim
        )
        self.instance_encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, n_classes)
        )

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.instance_encoder(bag).mean(dim=1)  # [1, hidden]
        return {"logits": self.classifier(embedding), "embedding": embedding}
