"""Dual-stream MIL (DSMIL), after Li, Li & Eliceiri, CVPR 2021."""

from __future__ import annotations

import math

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


@register("dsmil")
class DSMIL(MILModel):
    """Two streams over the projected instances ``h_i``:

    * instance stream: per-instance class scores ``c_i = W h_i``; its bag logits are their max over
      instances (``aux_logits``);
    * bag stream: for each class, the critical instance (highest score) queries every instance,
      ``a_ic = softmax_i(q_i . q_crit(c) / sqrt(d))``; the per-class bag embeddings ``b_c = sum_i a_ic v_i``
      are classified by a 1-D convolution spanning the whole embedding (``logits``).

    ``attention`` is the class-averaged ``a_i`` (non-negative, sums to 1); ``instance_scores`` are ``c_i``.
    Training averages the cross-entropies of ``logits`` and ``aux_logits``.
    """

    provides_attention = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        query_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(
            in_dim,
            n_classes,
            options={"hidden_dim": hidden_dim, "query_dim": query_dim, "dropout": dropout},
            embedding_dim=n_classes * hidden_dim,
        )
        self.instance_encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim))
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)
        self.scale = 1.0 / math.sqrt(query_dim)

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.instance_encoder(bag[0])  # [N, hidden]
        scores = self.instance_classifier(h)  # [N, C]
        critical = scores.argmax(dim=0)  # [C]: the top instance of each class
        queries = self.query(h)  # [N, query]
        similarity = queries @ queries[critical].T * self.scale  # [N, C]
        attention = torch.softmax(similarity.float(), dim=0).to(h.dtype)  # over instances, per class
        bags = attention.T @ self.value(h)  # [C, hidden]
        logits = self.bag_classifier(bags.unsqueeze(0)).squeeze(-1)  # [1, C]
        return {
            "logits": logits,
            "aux_logits": scores.max(dim=0).values.unsqueeze(0),
            "embedding": bags.reshape(1, -1),
            "attention": attention.mean(dim=1).unsqueeze(0),
            "instance_scores": scores.unsqueeze(0),
        }
