"""Gated-attention MIL (ABMIL), after Ilse, Tomczak & Welling, ICML 2018."""

from __future__ import annotations

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


@register("abmil")
class ABMIL(MILModel):
    """Instance encoder ``Linear+ReLU+Dropout``; gated attention
    ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``; bag ``z = sum_i a_i h_i``; ``Linear`` head.

    Memory and time are linear in the number of instances. Outputs ``logits``, ``embedding`` (``z``),
    ``attention`` (softmax weights, summing to 1) and ``attention_scores`` (pre-softmax).
    """

    provides_attention = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(
            in_dim,
            n_classes,
            options={"hidden_dim": hidden_dim, "attention_dim": attention_dim, "dropout": dropout},
            embedding_dim=hidden_dim,
        )
        self.instance_encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        # A bias on w would cancel in the softmax, so it is left out.
        self.attention_w = nn.Linear(attention_dim, 1, bias=False)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.instance_encoder(bag)  # [1, N, hidden]
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)  # [1, N]
        attention = torch.softmax(scores.float(), dim=-1)  # fp32 under autocast too: heatmaps read it
        embedding = torch.bmm(attention.unsqueeze(1).to(h.dtype), h).squeeze(1)  # [1, hidden]
        logits = self.classifier(embedding)
        return {"logits": logits, "embedding": embedding, "attention": attention, "attention_scores": scores}
