"""Dual-stream MIL (DSMIL), after Li, Li & Eliceiri, CVPR 2021."""

from __future__ import annotations

import math

import torch
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


@register("dsmil")
class DSMIL(MILModel):
    """Two streams over the projected instances ``h_i = Dropout(ReLU(W h_i^0))``:

    * instance stream: per-instance class scores ``s_i = W_0 h_i`` (``instance_scores`` [1, N, C]); its
      bag logits are their max over instances (``aux_logits`` [1, C]);
    * bag stream: for each class ``c`` the critical instance ``m_c = argmax_i s_ic`` queries every
      instance, ``A_ic = softmax_i(q_i . q_{m_c} / sqrt(query_dim))`` with ``q_i = tanh(W_q h_i)``; the
      per-class bag embeddings ``b_c = sum_i A_ic v_i`` (``v_i = W_v Dropout(h_i)``) form a ``C x hidden``
      matrix that a ``Conv1d`` with kernel ``hidden`` maps to the bag ``logits`` [1, C].

    ``embedding`` [1, C * hidden] is the flattened ``b``; ``class_attention`` [1, N, C] is ``A``;
    ``attention`` [1, N] is ``A`` averaged over the classes (non-negative, sums to 1). Training should
    average the cross-entropies of ``logits`` and ``aux_logits``. Memory and time are linear in ``N``
    (the similarity matrix is ``N x C``).
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
        if isinstance(query_dim, bool) or not isinstance(query_dim, int) or query_dim < 1:
            raise ValueError(f"query_dim must be a positive int, got {query_dim!r}")
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
        # One output channel per class, each reading the whole C x hidden matrix of bag embeddings.
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)
        self.scale = 1.0 / math.sqrt(query_dim)

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.instance_encoder(bag[0])  # [N, hidden]
        scores = self.instance_classifier(h)  # [N, C]
        critical = scores.detach().argmax(dim=0)  # [C]: the top-scoring instance of each class
        queries = self.query(h)  # [N, query]
        similarity = (queries @ queries[critical].T).float() * self.scale  # [N, C]
        class_attention = torch.softmax(similarity, dim=0)  # over instances, one column per class
        values = self.value(h)  # [N, hidden]
        bags = class_attention.T.to(values.dtype) @ values  # [C, hidden]
        logits = self.bag_classifier(bags.unsqueeze(0)).squeeze(-1)  # [1, C]
        return {
            "logits": logits,
            "aux_logits": scores.max(dim=0).values.unsqueeze(0),
            "embedding": bags.reshape(1, -1),
            "attention": class_attention.mean(dim=1).unsqueeze(0),
            "class_attention": class_attention.unsqueeze(0),
            "instance_scores": scores.unsqueeze(0),
        }
