"""DSMIL known answers: the instance and bag streams as the paper defines them, default and bad options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.builders import MIL_IN_DIM, MIL_N_CLASSES, SMALL_MIL_OPTIONS, small_mil_model
from ubc_ocean.mil.dsmil import DSMIL
from ubc_ocean.mil.registry import COMMON_OPTIONS, model_options

pytestmark = pytest.mark.usefixtures("single_torch_thread")

QUERY_DIM = SMALL_MIL_OPTIONS["dsmil"]["query_dim"]


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("batched", [False, True])
def test_streams_for_any_bag_size(n: int, batched: bool) -> None:
    """The instance stream's bag logits are the max of its instance scores; each class's attention column is
    a softmax over the instances."""
    model = small_mil_model("dsmil").train()
    bag = torch.randn(n, MIL_IN_DIM)
    out = model(bag[None] if batched else bag)
    torch.testing.assert_close(out["aux_logits"], out["instance_scores"].amax(dim=1))
    assert out["class_attention"].shape == (1, n, MIL_N_CLASSES)
    assert (out["class_attention"] >= 0).all()
    torch.testing.assert_close(out["class_attention"].sum(dim=1), torch.ones(1, MIL_N_CLASSES))


def test_bag_stream_follows_the_paper() -> None:
    """Critical instance per class = argmax of its instance score; attention = softmax over instances of
    q_i . q_crit / sqrt(query_dim); bag embedding = attention-weighted sum of values; logits = Conv1d."""
    model = small_mil_model("dsmil").eval()
    assert isinstance(model, DSMIL)
    bag = torch.randn(40, MIL_IN_DIM)
    with torch.no_grad():
        out = model(bag)
        h = model.instance_encoder(bag)
        scores = model.instance_classifier(h)
        q, v = model.query(h), model.value(h)
        columns, embeddings = [], []
        for c in range(MIL_N_CLASSES):
            critical = int(scores[:, c].argmax())
            a = torch.softmax(q @ q[critical] / math.sqrt(QUERY_DIM), dim=0)  # [N]
            columns.append(a)
            embeddings.append(a @ v)
        attention = torch.stack(columns, dim=1)  # [N, C]
        b = torch.stack(embeddings)  # [C, hidden]
        conv = model.bag_classifier
        logits = (conv.weight.reshape(MIL_N_CLASSES, -1) @ b.reshape(-1) + conv.bias)[None]
    torch.testing.assert_close(out["instance_scores"][0], scores)
    torch.testing.assert_close(out["class_attention"][0], attention)
    torch.testing.assert_close(out["attention"][0], attention.mean(dim=1))
    torch.testing.assert_close(out["embedding"], b.reshape(1, -1))
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["aux_logits"][0], scores.max(dim=0).values)


def test_default_options() -> None:
    assert model_options("dsmil") == {"hidden_dim": 256, "query_dim": 128, "dropout": 0.25, **COMMON_OPTIONS}


@pytest.mark.parametrize(
    ("options", "match"), [({"query_dim": 0}, "query_dim"), ({"hidden_dim": 0}, "embedding_dim")]
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_mil_model("dsmil", **options)
