"""Chowder known answers: the embedding is each class's top and bottom instance scores; default and bad options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.builders import MIL_IN_DIM, small_mil_model
from ubc_ocean.mil import create_mil_model
from ubc_ocean.mil.chowder import Chowder, extreme_scores
from ubc_ocean.mil.registry import COMMON_OPTIONS, model_options

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_embedding_is_top_and_bottom_scores() -> None:
    model = small_mil_model("chowder").eval()  # n_top = n_bottom = 3
    assert isinstance(model, Chowder)
    with torch.no_grad():
        out = model(torch.randn(25, MIL_IN_DIM))
    scores = out["channel_scores"][0]  # [N, C * channels_per_class]
    ordered = scores.sort(dim=0, descending=True).values
    expected = torch.cat([ordered[:3], ordered[-3:].flip(0)], dim=0).T.reshape(1, -1)
    torch.testing.assert_close(out["embedding"], expected)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model.mlp(expected))


def test_instance_scores_average_each_class_channel_group() -> None:
    model = small_mil_model("chowder", channels_per_class=2).eval()
    with torch.no_grad():
        out = model(torch.randn(7, MIL_IN_DIM))
    channels = out["channel_scores"][0]
    assert channels.shape == (7, 2 * model.n_classes)
    torch.testing.assert_close(out["instance_scores"][0], (channels[:, 0::2] + channels[:, 1::2]) / 2)
    assert out["embedding"].shape == (1, 2 * model.n_classes * 6)


def test_extreme_scores_pad_small_bags() -> None:
    scores = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    got = extreme_scores(scores, n_top=3, n_bottom=2)
    assert got.tolist() == [[3.0, 1.0, 1.0, 1.0, 3.0], [2.0, -1.0, -1.0, -1.0, 2.0]]
    one = torch.tensor([[0.5, -2.0]])
    assert extreme_scores(one, n_top=2, n_bottom=3).tolist() == [[0.5] * 5, [-2.0] * 5]
    assert extreme_scores(scores, n_top=1, n_bottom=0).tolist() == [[3.0], [2.0]]


def test_default_options_and_head() -> None:
    assert model_options("chowder") == {"n_top": 5, "n_bottom": 5, "hidden_dims": (200, 100), "dropout": 0.5,
                                        "channels_per_class": 3, **COMMON_OPTIONS}
    chowder = create_mil_model("chowder", 1024, 5)
    widths = [layer.out_features for layer in chowder.mlp if isinstance(layer, nn.Linear)]
    assert widths == [200, 100, 5]
    assert all(layer.p == 0.5 for layer in chowder.mlp if isinstance(layer, nn.Dropout))


def test_hidden_dims_tuple_or_list() -> None:
    as_tuple = small_mil_model("chowder", hidden_dims=(16, 8))
    as_list = small_mil_model("chowder", hidden_dims=[16, 8])
    assert as_tuple.config == as_list.config
    assert as_tuple.config["options"]["hidden_dims"] == [16, 8]
    assert small_mil_model("chowder", hidden_dims=[]).config["options"]["hidden_dims"] == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_top": 0}, "n_top"),
        ({"n_bottom": -1}, "n_bottom"),
        ({"hidden_dims": [16, 0]}, "hidden_dims"),
        ({"hidden_dims": 16}, "hidden_dims"),
        ({"hidden_dims": "16"}, "hidden_dims"),
        ({"channels_per_class": 0}, "channels_per_class"),
    ],
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_mil_model("chowder", **options)
